"""Paper-style evaluation of cache schedules on a prompt file (COCO captions, PartiPrompts: one per line).

For users with real checkpoints and a GPU, e.g.:

    python scripts/eval_fid_clip.py --pipeline runwayml/stable-diffusion-v1-5 --prompts coco_30k.txt \\
        --schedule deepcache:interval=3,branch=1 deepcache:interval=5 --reference-dir coco_val2014/ \\
        --device cuda --dtype float16 --limit 5000 --out sd15_coco.jsonl

It runs `diffcache.eval.runner.evaluate` (resumable; prefix with `accelerate launch --num_processes N` to split the
prompts over GPUs) with FID (Inception features; reference = --reference-dir, else the full model's images),
CLIP score, PSNR and SSIM against the full model at the same seeds, and prints the summary table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffcache.cli import format_summaries
from diffcache.eval.runner import EvalConfig, evaluate
from diffcache.loading import load_any_pipeline, parse_conditions, read_prompt_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--schedule", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--reference-dir", type=Path, default=None, help="real images for FID (e.g. COCO val)")
    parser.add_argument("--metrics", default="fid,clip,psnr,ssim")
    parser.add_argument("--clip-model", default="openai/clip-vit-base-patch16")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args()

    from accelerate import PartialState

    device = PartialState().device if args.device == "cuda" else torch.device(args.device)
    pipe = load_any_pipeline(args.pipeline, torch_dtype=getattr(torch, args.dtype)).to(device)
    conditions = parse_conditions(pipe, read_prompt_file(args.prompts))[: args.limit]
    config = EvalConfig(
        schedules=args.schedule, conditions=conditions, metrics=args.metrics.split(","), out=args.out,
        num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed, clip_model=args.clip_model,
        reference_dir=args.reference_dir,
    )
    rows = evaluate(pipe, config)
    if rows:
        print(format_summaries(rows))


if __name__ == "__main__":
    main()
