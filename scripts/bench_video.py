"""Video caching side by side: diffcache presets, a searched schedule and diffusers' own caches, one process.

    python scripts/bench_video.py                       # the trained digits-video default, then tiny pipelines
    python scripts/bench_video.py --skip-tiny --per-class 4 --repeats 3
    python scripts/bench_video.py --skip-default --tiny wan cogvideox

**Trained default** (``digits-video``: 8-frame moving digits, a latent ``WanTransformer3DModel``): full,
Wan's block and component presets, a ``dp`` schedule searched at ``latency:2x`` on 10 calibration labels
(another seed; the final round against the presets), and diffusers' ``apply_first_block_cache`` /
``apply_taylorseer_cache`` / ``apply_faster_cache`` at several settings. Measured speedups are medians of
alternated timed runs after a warm-up (``bench.compare_methods``); quality: per-frame accuracy of the shipped
classifier with its 95% bootstrap interval over clips, clip consistency, motion residual, per-clip Fréchet
distance to held-out real clips, per-clip PSNR vs full with its 95% interval; each diffusers cache is
compared with the searched schedule by a paired PSNR interval.

**Tiny real-architecture pipelines** (``diffcache.testing.video``, random weights): speed and peak RSS only,
full vs a block and a component preset.

One thread (``torch.set_num_threads(1)``) unless ``--threads``.
"""

from __future__ import annotations

import argparse
import logging
import torch

from diffcache.eval.baselines import BaselineUnavailable, diffusers_cache
from diffcache.eval.bench import FULL, compare_methods, label, psnr_cell
from diffcache.eval.demo import SEARCH_SEED
from diffcache.eval.intervals import bootstrap, paired
from diffcache.eval.video_demo import SEARCH_BUDGET, VIDEO_SCHEDULES
from diffcache.memory import format_mib

logger = logging.getLogger("bench_video")

DIFFUSERS = {
    **{f"diffusers first_block_cache threshold={t}": ("first_block_cache", {"threshold": t}) for t in (0.1, 0.2, 0.3)},
    **{f"diffusers taylorseer interval={n}": ("taylorseer", {"cache_interval": n, "disable_cache_before_step": 2})
       for n in (2, 3)},
    "diffusers faster_cache": ("faster_cache", {}),
}
TINY_PRESETS = {"wan": ["uniform:interval=2", "fora:interval=2"], "cogvideox": ["uniform:interval=2", "fora:interval=2"],
                "ltx": ["uniform:interval=2", "fora:interval=2"], "hunyuanvideo": ["uniform:interval=2", "fora:interval=2"],
                "animatediff": ["deepcache:interval=2", "deepcache:interval=3"]}


def bench_default(args: argparse.Namespace) -> str:
    import diffcache
    from diffcache.models import VIDEO_GUIDANCE_SCALE, VIDEO_STEPS, load_classifier, load_pipeline, video_quality
    from diffcache.models.moving_digits import moving_digits

    pipe = load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier()
    real, _, _ = moving_digits("test", per_digit=1, seed=11)
    labels = [i % 10 for i in range(10 * args.per_class)]

    def make_kwargs() -> dict:
        return {"class_labels": labels, "guidance_scale": VIDEO_GUIDANCE_SCALE, "output_type": "np",
                "num_inference_steps": VIDEO_STEPS, "generator": torch.Generator().manual_seed(0)}

    searched = diffcache.search(pipe, list(range(10)), "dp", SEARCH_BUDGET, num_inference_steps=VIDEO_STEPS,
                                guidance_scale=VIDEO_GUIDANCE_SCALE, seed=SEARCH_SEED, batch_size=10, progress=False)
    others = {}
    for name, (baseline, params) in DIFFUSERS.items():
        try:  # refuse now what cannot apply, not in the middle of the timed rounds
            with diffusers_cache(pipe, baseline, **params):
                pipe(**make_kwargs() | {"class_labels": [0], "num_inference_steps": 3})
        except BaselineUnavailable as err:
            logger.warning("%s: not applicable (%s)", name, err)
            continue
        others[name] = lambda b=baseline, p=params: diffusers_cache(pipe, b, **p)
    rows = compare_methods(pipe, make_kwargs, [*VIDEO_SCHEDULES, searched], args.repeats, progress=True, others=others)
    target = torch.tensor(labels).view(-1, 1)
    ours = next(r for r in rows if r.method == label(searched))
    lines = [
        f"**digits-video**: {len(labels)} clips x 8 frames per method, {VIDEO_STEPS} DDIM steps, CFG "
        f"{VIDEO_GUIDANCE_SCALE}, batch {len(labels)}, {args.threads} thread(s), {args.repeats} timed rounds",
        "",
        "| method | measured speedup | frame accuracy [95%] | consistent clips | motion residual px | clip FD "
        "| PSNR vs full dB [95%] | PSNR vs searched dB [paired 95%] | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        preds = video_quality.frame_predictions(r.images, classifier)
        per_clip = (preds == target).float().mean(dim=1).double().numpy()
        acc = bootstrap(per_clip)
        q = video_quality.clip_quality(r.images, torch.tensor(labels), classifier, real)
        if r is ours or r.method == FULL:
            versus = "-"
        else:
            d = paired(r.psnr_images, ours.psnr_images)
            versus = f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
        method = "full (no cache)" if r.method == FULL else r.method
        lines.append(f"| {method} | {r.speedup:.2f}x | {acc.mean:.1%} [{acc.low:.1%}, {acc.high:.1%}] | "
                     f"{q['clip_consistency']:.0%} | {q['motion_residual']:.2f} | {q['fd']:.1f} | {psnr_cell(r)} | "
                     f"{versus} | {format_mib(r.peak_rss)} |")
    lines.append("")
    lines.append(f"searched schedule: {searched.meta.get('arena', {}).get('chosen', searched.method)}")
    return "\n".join(lines)


def bench_tiny(args: argparse.Namespace) -> str:
    from diffcache.testing.video import build_video_pipeline, video_call_kwargs

    lines = ["**tiny real-architecture pipelines** (random weights: speed and memory only)", "",
             "| pipeline | method | measured speedup | peak RSS MiB |", "|---|---|---|---|"]
    for name in args.tiny:
        pipe = build_video_pipeline(name, seed=0)
        pipe.set_progress_bar_config(disable=True)
        steps = 10

        def make_kwargs(name=name) -> dict:
            return video_call_kwargs(name) | {"num_inference_steps": steps}

        rows = compare_methods(pipe, make_kwargs, TINY_PRESETS[name], args.repeats, progress=False)
        for r in rows:
            lines.append(f"| {name} | {r.method} | {r.speedup:.2f}x | {format_mib(r.peak_rss)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=2, help="clips per digit class and method (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-default", action="store_true")
    parser.add_argument("--skip-tiny", action="store_true")
    parser.add_argument("--tiny", nargs="*", default=list(TINY_PRESETS), choices=list(TINY_PRESETS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if not args.skip_default:
        print(bench_default(args), flush=True)
    if not args.skip_tiny:
        print("\n" + bench_tiny(args), flush=True)


if __name__ == "__main__":
    main()
