"""The ``diffcache`` command.

Exit codes: 0 success; 2 usage errors (argparse); 1 a diffcache error (one line, ``--debug`` for the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConditionError, DiffcacheError, PipelineNotFoundError

# Names for help texts only: the parser is built without torch, so `--help` and usage errors answer at once. The
# handlers check against the live registries (tests/test_cli.py keeps these lists equal to them).
METRICS_HELP = ("fid", "clip", "psnr", "ssim", "acc")
METHODS_HELP = ("dp", "bac", "ecad", "router")
QUALITIES_HELP = ("psnr", "accuracy", "fid")
FORECAST_CHOICES = (0, 1, 2)


def _count(text: str) -> int:
    """An argparse type: an integer >= 1 (the value the user gave is reported otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from .eval.demo import run_demo

    torch.set_num_threads(args.threads)
    what = "the embedded video default (Wan)" if args.video else "the embedded digits models (DiT and UNet)"
    print(
        f"diffcache demo: {what} against cache presets; speed measured side by "
        f"side ({args.repeats} alternated runs after a warm-up, {args.threads} thread(s)), quality vs real digits "
        "and vs the full model at the same seeds.\n"
    )
    start = time.perf_counter()
    if args.video:
        if args.quant:
            args.parser.error("--quant is for the image models; run the video demo without it")
        from .eval.video_demo import run_video_demo

        print(run_video_demo(args.out, args.per_class or 2, args.repeats, progress=not args.quiet))
        print(f"demo took {time.perf_counter() - start:.0f} s")
        return 0
    print(run_demo(args.out, args.per_class or 10, args.repeats, progress=not args.quiet, quant=args.quant))
    print(f"demo took {time.perf_counter() - start:.0f} s")
    return 0


def _load(args: argparse.Namespace) -> Any:
    from .loading import load_any_pipeline

    try:
        pipe = load_any_pipeline(args.pipeline)
    except PipelineNotFoundError as err:
        args.parser.error(str(err))
    if args.quiet and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(args: argparse.Namespace) -> int:
    from PIL import Image

    from . import accelerate, summary
    from .data import generate
    from .eval.metrics import to_uint8
    from .loading import generation_kwargs, is_class_conditional

    pipe = _load(args)
    conditional = is_class_conditional(pipe)
    if conditional == (args.class_label is None):
        args.parser.error(f"{type(pipe).__name__} takes {'--class-label' if conditional else '--prompt'}")
    condition = args.class_label if conditional else args.prompt
    try:  # checked before the model is touched
        kwargs = generation_kwargs(pipe, condition, args.seed, args.steps, args.guidance)
    except ConditionError as err:
        args.parser.error(str(err))
    accelerate(pipe, args.schedule, quant=args.quant, keep_float_weights=False)  # one image, nothing to restore
    Image.fromarray(to_uint8(generate(pipe, kwargs)[0])).save(args.out)
    print(summary(pipe))  # with --quant, its last line says which layers run int8 and which are simulated
    print(f"wrote {args.out}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .quant import calibrate

    pipe, conditions = _pipeline_and_conditions(args)
    calibration = calibrate(pipe, conditions, args.config, schedule=args.schedule, num_inference_steps=args.steps,
                            guidance_scale=args.guidance, seed=args.seed, batch_size=args.batch_size,
                            progress=not args.quiet)
    widths = calibration.ranges[..., 1] - calibration.ranges[..., 0]
    print(f"{calibration.config.name}: {len(calibration.layers)} layers, {calibration.num_steps} steps; input "
          f"ranges vary up to {float((widths.max(1) / widths.min(1).clip(1e-12)).max()):.1f}x across steps")
    if args.finetune:
        from .quant import finetune

        # the checkpoint sits beside the output: rerunning the same command after an interruption resumes
        checkpoint = args.checkpoint or f"{args.out}.ckpt.npz"
        calibration = finetune(pipe, conditions, calibration, epochs=args.finetune, rank=args.rank,
                               guidance_scale=args.guidance, seed=args.seed, lr_scale=args.lr_scale,
                               checkpoint=checkpoint, progress=not args.quiet)
        losses = calibration.training["losses"]
        print(f"EfficientDM: {args.finetune} epochs in {calibration.training['seconds']:.0f} s, distillation loss "
              f"{losses[0]:.3g} (first epoch) -> {losses[-1]:.3g} (last); checkpoint {checkpoint}")
    calibration.save(args.out)
    print(f"wrote {args.out}; use it with: diffcache run --pipeline {args.pipeline} --schedule ... --quant {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval.metrics import METRIC_NAMES
    from .eval.runner import EvalConfig, evaluate
    from .loading import BUILTIN_PREFIX

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        args.parser.error(f"unknown metrics {unknown}; choose from {', '.join(METRIC_NAMES)}")
    pipe, conditions = _pipeline_and_conditions(args)
    digits = args.pipeline.startswith(BUILTIN_PREFIX)
    config = EvalConfig(
        schedules=args.schedule, conditions=conditions, metrics=metrics, out=args.out,
        num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
        fid_features=args.fid_features or ("digits" if digits else "inception"), clip_model=args.clip_model,
        quant=args.quant,
    )
    rows = evaluate(pipe, config, progress=not args.quiet)
    if rows:
        print(format_summaries(rows))
    return 0


def _search(args: argparse.Namespace) -> int:
    import time

    from . import models  # noqa: F401  (registers the digits classifier's quality objectives)
    from .eval.quality import quality_names
    from .schedules.budget import Budget
    from .schedules.methods import search_methods
    from .schedules.search import search

    if args.method not in search_methods():
        args.parser.error(f"argument --method: invalid choice: {args.method!r} (choose from "
                          f"{', '.join(search_methods())})")
    if args.quality not in quality_names():
        args.parser.error(f"argument --quality: invalid choice: {args.quality!r} (choose from "
                          f"{', '.join(quality_names())})")
    try:
        budget = Budget.parse(args.budget)
    except ValueError as err:
        args.parser.error(str(err))
    pipe, conditions = _pipeline_and_conditions(args)
    options = _options(args)
    out = Path(args.out)
    start = time.perf_counter()
    schedule = search(
        pipe, conditions, args.method, budget, num_inference_steps=args.steps, guidance_scale=args.guidance,
        seed=args.seed, batch_size=args.batch_size, granularity=args.granularity, quality=args.quality,
        out_dir=out.parent / f"{out.stem}-search", resume=args.resume, forecast=args.forecast,
        presets=args.presets, progress=not args.quiet, **options,
    )
    schedule.save(out)
    meta = schedule.meta
    print(f"{args.method} search: {schedule.num_steps} steps, {len(schedule.units)} units x "
          f"{len(schedule.components)} components; predicted {budget.measure} speedup {meta['predicted_speedup']:.2f}x "
          f"(budget {budget}), cache usage {schedule.cache_usage_ratio:.1%}, {time.perf_counter() - start:.0f} s")
    arena = meta.get("arena")
    if arena is not None:
        best = arena["best_preset"]
        print(f"final round: {arena['chosen']} won among {arena['candidates']} candidates on the calibration set "
              f"(quality {arena['calibration_quality']:.3f}" + (f"; best preset {best['label']} "
              f"{best['calibration_quality']:.3f})" if best else ")"))
        held = arena.get("held_out")
        if held is not None:
            line = (f"held out ({held['conditions']} conditions, other seeds): {held['chosen_quality']:.3f} vs the "
                    f"preset's {held['best_preset_quality']:.3f}")
            if "psnr_difference" in held:
                d = held["psnr_difference"]
                line += f"; PSNR difference {d['mean']:+.2f} dB [{d['low']:+.2f}, {d['high']:+.2f}] (95%, paired)"
            print(line)
    print(f"wrote {out}; run it with: diffcache run --pipeline {args.pipeline} --schedule {out} ...")
    return 0


def _pipeline_and_conditions(args: argparse.Namespace) -> tuple[Any, list[str | int]]:
    """The pipeline and the first ``--limit`` prompts / class ids of ``--prompts`` (usage errors exit 2)."""
    from .loading import parse_conditions, read_prompt_file

    try:
        lines = read_prompt_file(args.prompts)
    except (FileNotFoundError, ValueError) as err:
        args.parser.error(str(err))
    pipe = _load(args)
    try:
        return pipe, parse_conditions(pipe, lines)[: args.limit]
    except ValueError as err:
        args.parser.error(str(err))


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """``--option key=value`` pairs, values read as int, float, bool or string."""
    options: dict[str, Any] = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            args.parser.error(f"--option takes key=value, got {item!r}")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def format_summaries(rows: list[dict[str, Any]]) -> str:
    """A markdown table of evaluation summary rows."""
    keys = [k for k in ("method", "images", "seconds_per_image", "speedup", "macs_speedup", "cache_usage_ratio",
                        "fid", "acc", "clip", "psnr", "ssim") if any(k in r for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _summary(args: argparse.Namespace) -> int:
    import os

    from .schedule import Schedule
    from .schedules.presets import build_from_tag, is_preset, parse_tag

    if is_preset(args.schedule) or (":" in args.schedule and not os.path.exists(args.schedule)):
        try:
            parse_tag(args.schedule)
        except DiffcacheError as err:
            args.parser.error(str(err))
        if not args.pipeline:  # a tag's units and bits depend on the model and the step count
            args.parser.error(f"{args.schedule!r} is a preset tag: pass --pipeline (and --steps) to lay it out")
        from .adapters import denoiser_of, resolve_adapter

        pipe = _load(args)
        steps = args.steps or 50
        schedule = build_from_tag(args.schedule, resolve_adapter(denoiser_of(pipe)), steps)
    else:
        pipe, schedule = None, Schedule.load(args.schedule)
    data = schedule.to_dict()
    print(repr(schedule))
    if schedule.model:
        print(f"model: {schedule.model['class']} (config {schedule.model['fingerprint']})")
    print(f"units ({len(schedule.units)}): {', '.join(schedule.units)}")
    print(f"components: {', '.join(schedule.components)}")
    macs = _schedule_macs(args, schedule, pipe) if args.pipeline else None
    if macs is not None:
        speedup = macs[0] * len(macs[1]) / macs[1].sum()
        print(f"MACs per denoiser call: full {macs[0]:.3g}; theoretical speedup {speedup:.2f}x")
    print(f"cache usage ratio {schedule.cache_usage_ratio:.1%}; per step (1 recompute, 0 reuse, - absent):")
    width = len(str(schedule.num_steps - 1))
    for k, line in enumerate(data["steps"]):
        cost = f"  {macs[1][k]:.3g} MACs" if macs is not None else ""
        print(f"  {k:>{width}}  {line}{cost}")
    return 0


def _schedule_macs(args: argparse.Namespace, schedule: Any, pipe: Any = None) -> tuple[float, Any]:
    """Full MACs per denoiser call and the schedule's MACs per step, measured on ``args.pipeline``."""
    from .adapters import denoiser_of, resolve_adapter
    from .eval.cost import profile_macs
    from .loading import generation_kwargs, is_class_conditional

    pipe = pipe if pipe is not None else _load(args)
    pipe.set_progress_bar_config(disable=True)
    resolve_adapter(denoiser_of(pipe)).check_schedule(schedule)
    condition = 0 if is_class_conditional(pipe) else "a photo"
    profile = profile_macs(pipe, generation_kwargs(pipe, condition, 0, 1, None), schedule.granularity)
    return profile.total, profile.step_cost(schedule)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffcache",
        description="Training-free acceleration of diffusers pipelines: feature caching across denoising steps.",
        epilog="Example: diffcache demo",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only, no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="the embedded digits models vs cache presets: speed, FID, accuracy, PSNR (offline, a few minutes)",
        description="Runs the shipped digits DiT and UNet pipelines in full and with cache presets on the same "
        "seeds, times them side by side, scores them (Fréchet distance of classifier features to real digits, "
        "classifier accuracy, PSNR vs full) and writes OUT/grid.png and OUT/pareto.png.",
        epilog="Example: diffcache demo --out demo-out",
    )
    demo.add_argument("--out", default="demo-out", help="folder for grid.png and pareto.png (default demo-out)")
    demo.add_argument("--per-class", type=_count, default=None,
                      help="images (clips with --video) per digit class and method (default 10; 2 with --video)")
    demo.add_argument("--video", action="store_true",
                      help="the video default (digits-video, a Wan transformer) instead: writes OUT/clips.gif and "
                      "OUT/strip.png")
    demo.add_argument("--repeats", type=_count, default=2, help="timed runs per method (default 2)")
    demo.add_argument("--threads", type=_count, default=1, help="torch threads (default 1: stable timings)")
    demo.add_argument("--quant", default=None, help="also run the models quantized with this preset (e.g. w8a8)")
    demo.set_defaults(handler=_demo, parser=demo)

    run = commands.add_parser(
        "run",
        help="generate one image with a schedule",
        description="Loads a pipeline (built-in, local directory or hub id), accelerates it and saves one image.",
        epilog="Example: diffcache run --pipeline digits-dit --schedule fora:interval=2 --class-label 7 --out 7.png",
    )
    _pipeline_args(run)
    run.add_argument("--schedule", default="none", help="preset tag or schedule JSON (default: none)")
    condition = run.add_mutually_exclusive_group(required=True)
    condition.add_argument("--prompt", help="text prompt (text-to-image pipelines)")
    condition.add_argument("--class-label", type=int, help="class id (class-conditional pipelines)")
    run.add_argument("--out", required=True, help="output PNG path")
    run.add_argument("--quant", default=None,
                     help="quantization calibration (.npz from `diffcache quantize`) or the weight-only preset w8")
    run.set_defaults(handler=_run, parser=run)

    quantize = commands.add_parser(
        "quantize",
        help="calibrate post-training quantization (per-step activation ranges) on your prompts",
        description="Runs the pipeline on the prompts (or class ids) in PROMPTS and records every Linear/Conv2d "
        "input range at every step; writes a calibration that `run --quant` and accelerate(pipe, s, quant=...) "
        "load. Calibrate with the step count, guidance and cache schedule you will deploy with. With --finetune, "
        "the quantized model is then distilled from the float one (EfficientDM), which 4-bit configs need.",
        epilog="Examples: diffcache quantize --pipeline digits-dit --prompts labels.txt --config w8a8 --out w8a8.npz; "
        "diffcache quantize --pipeline digits-unet --prompts labels.txt --config w4a8 --finetune 80 --out w4a8-ft.npz",
    )
    _pipeline_args(quantize)
    quantize.add_argument("--prompts", required=True, help="calibration prompts / class ids, one per line")
    quantize.add_argument("--config", default="w8a8", help="w8a8 (default), w4a8 or w4a4")
    quantize.add_argument("--finetune", type=_count, default=None, metavar="EPOCHS",
                          help="then fine-tune the quantized model with EfficientDM (QALoRA + per-step activation "
                          "quantizers) for EPOCHS float-model trajectories; best below 8 bits")
    quantize.add_argument("--rank", type=_count, default=32, help="--finetune: LoRA rank (default 32)")
    quantize.add_argument("--lr-scale", type=float, default=32.0,
                          help="--finetune: multiplier of the paper's LoRA learning rate (default 32, for ~80 epochs)")
    quantize.add_argument("--checkpoint", default=None,
                          help="--finetune: training checkpoint, resumed if present (default OUT.ckpt.npz)")
    quantize.add_argument("--schedule", default=None, help="calibrate on this schedule's cached trajectory")
    quantize.add_argument("--out", required=True, help="calibration .npz to write")
    quantize.add_argument("--batch-size", type=_count, default=8, help="images per call (default 8)")
    quantize.add_argument("--limit", type=_count, default=None, help="use only the first N prompts")
    quantize.set_defaults(handler=_quantize, parser=quantize)

    evaluate = commands.add_parser(
        "eval",
        help="speed and quality of schedules against the full model (resumable; accelerate launch for N processes)",
        description="Generates one image per prompt (seed + line number) with the full model and with each "
        "schedule, and writes per-image rows and per-method summaries to a JSONL file. Re-running skips finished "
        "images. Under `accelerate launch --num_processes N -m diffcache eval ...` the prompts are split over "
        "the processes.",
        epilog="Example: diffcache eval --pipeline digits-dit --schedule fora:interval=2 uniform:interval=3 "
        "--prompts labels.txt --metrics fid,acc,psnr --out results.jsonl",
    )
    _pipeline_args(evaluate)
    evaluate.add_argument("--schedule", nargs="+", required=True, help="preset tags or schedule JSON files")
    evaluate.add_argument("--prompts", required=True, help="file with one prompt (or class id / label) per line")
    evaluate.add_argument("--metrics", default="psnr,ssim", help=f"comma list from {','.join(METRICS_HELP)}")
    evaluate.add_argument("--out", required=True, type=Path, help="results JSONL (images go beside it)")
    evaluate.add_argument("--limit", type=_count, default=None, help="use only the first N prompts")
    evaluate.add_argument("--fid-features", choices=["inception", "digits"], default=None,
                          help="FID feature extractor (default: digits for digits-* pipelines, else inception)")
    evaluate.add_argument("--clip-model", default="openai/clip-vit-base-patch16",
                          help="hub id or local directory of the CLIP model for the clip metric")
    evaluate.add_argument("--quant", default=None,
                          help="run every schedule quantized: a `diffcache quantize` calibration or the preset w8")
    evaluate.set_defaults(handler=_eval, parser=evaluate)

    search = commands.add_parser(
        "search",
        help="find the best schedule for a pipeline on your prompts under a budget (dp, bac, ecad, router)",
        description="Calibrates on the prompts (or class ids) in PROMPTS with the full model and searches a cache "
        "schedule that fits the budget: dp (CacheQuant segmentation), bac (block-wise adaptive + bubbling union), "
        "ecad (NSGA-II over all bits, resumable; writes the Pareto front) or router (HarmoniCa). Writes the "
        "schedule JSON to --out and working files (calibration, checkpoint, front, pareto.png) beside it in "
        "OUT-search/.",
        epilog="Example: diffcache search --pipeline digits-dit --prompts labels.txt --method ecad --budget 2.5x "
        "--out dit-ecad.json",
    )
    _pipeline_args(search)
    search.add_argument("--prompts", required=True, help="calibration prompts / class ids, one per line")
    search.add_argument("--method", default="dp", help=f"{', '.join(METHODS_HELP)} or a registered method (default dp)")
    search.add_argument("--budget", default="2x",
                        help="'2x' (MACs speedup), 'latency:2x', 'recompute:0.4' or a MACs fraction (default 2x)")
    search.add_argument("--out", required=True, help="schedule JSON to write")
    search.add_argument("--granularity", choices=["block", "component"], default=None,
                        help="default: component for bac/ecad/router on transformers, else block")
    search.add_argument("--quality", default="psnr",
                        help=f"{', '.join(QUALITIES_HELP)} or a registered objective: ECAD's quality objective (accuracy/fid: digits models only; default psnr vs full)")
    search.add_argument("--batch-size", type=_count, default=16, help="calibration images per call (default 16)")
    search.add_argument("--limit", type=_count, default=None, help="use only the first N prompts")
    search.add_argument("--resume", action="store_true", help="continue an interrupted ECAD run")
    search.add_argument("--forecast", type=int, choices=list(FORECAST_CHOICES), default=None,
                        help="fix what reuse steps serve: 0 a copy of the cache, 1 or 2 its Taylor forecast of that "
                        "order (2 or 3 times the cache memory); default: measured on the calibration set")
    search.add_argument("--no-presets", dest="presets", action="store_false",
                        help="return the method's own pick, without the final round against every preset that "
                        "fits the budget")
    search.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="method setting, repeatable: generations=20, population=24, branch=0, epochs=8, ...")
    search.set_defaults(handler=_search, parser=search)

    summary = commands.add_parser(
        "summary",
        help="describe a schedule JSON file or a preset tag",
        description="Prints a schedule's method, model, units and per-step recompute bits (a preset tag is laid "
        "out on --pipeline for --steps).",
        epilog="Example: diffcache summary schedule.json --pipeline digits-dit; "
        "diffcache summary deepcache:interval=3 --pipeline digits-unet --steps 25",
    )
    summary.add_argument("schedule", help="path to a schedule JSON file, or a preset tag (needs --pipeline)")
    summary.add_argument("--pipeline", default=None, help="also print MACs per step, measured on this pipeline")
    summary.add_argument("--steps", type=_count, default=None, help="steps to lay a preset tag out for (default 50)")
    summary.set_defaults(handler=_summary, parser=summary)
    return parser


def _pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_count, default=None,
                        help="torch threads (default: torch's; 1 is steadier on a busy machine)")
    parser.add_argument("--pipeline", required=True, help="digits-dit, digits-unet, a local directory or a hub id")
    parser.add_argument("--steps", type=_count, default=None, help="num_inference_steps (default: the pipeline's)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image (default 0)")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required (e.g. `diffcache demo`)")
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # transformers warns at import that torchvision is missing (it falls back to PIL); noise for the CLI.
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
    handler: Callable[[argparse.Namespace], int] = args.handler
    if getattr(args, "threads", None) and args.command != "demo":  # the demo pins its own
        import torch

        torch.set_num_threads(args.threads)
    if args.quiet:  # -q: no progress bars, diffusers' included
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    try:
        return handler(args)
    except (DiffcacheError, FileNotFoundError) as err:
        if args.debug:
            raise
        print(f"diffcache {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
