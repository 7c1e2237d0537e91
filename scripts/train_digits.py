"""Trains the embedded digits models of ``diffcache.models`` and writes their weights into the package.

    python scripts/train_digits.py                 # train everything, save, then evaluate (CPU, 2 threads)
    python scripts/train_digits.py --eval-only     # evaluate the shipped weights again
    python scripts/train_digits.py --out DIR --skip-eval   # train into another folder (e.g. to compare)

Data: scikit-learn's digits at 32x32 (``diffcache.models.digits``), train split only; the 359 held-out
digits are kept for evaluation. Deterministic: fixed seeds, fixed thread count (``--threads``, default 2;
another count may change the float rounding), deterministic algorithms; two runs write identical files.
Parts, in order (each seeded on its own):

1. classifier: ``DigitClassifier`` (3 conv blocks 16/32/64, 128-d features) on randomly shifted, rotated
   and scaled digits;
2. VAE: ``AutoencoderKL`` (1 channel, blocks 32/64/64, latent 4x8x8), MSE + small KL on augmented digits;
   its ``scaling_factor`` is 1 / std of the training latents (posterior samples);
3. DiT: ``DiTTransformer2DModel`` (hidden 128 = 4 heads x 32, 6 blocks, patch 1, i.e. 64 tokens), epsilon
   prediction on a linear-beta 1000-step schedule, labels replaced by the null class 1000 10 % of the time
   (diffusers' per-block label dropout is switched off), AdamW with warm-up and cosine decay, EMA weights;
   the latents are fresh posterior samples of the train digits each step;
4. UNet: class-conditional ``UNet2DModel`` (blocks 32/64, DownBlock2D + AttnDownBlock2D, 2 layers per
   block, GroupNorm with 8 groups, 11 class embeddings, 10 = null), trained the same way.

Design notes measured on this CPU (500-step probes, accuracy at guidance 3, 100 images): a patch-2 DiT
learns the class conditioning slowly (hidden 128: 65 %, hidden 192: 75 %), patch 1 reaches 98 % in the
same wall time; 32 GroupNorm groups on 32 channels (instance norm on 8x8 maps) crippled the UNet (48 %
after 1,200 steps), 8 groups gave 89 % after 500; a higher learning rate (1.5e-3) helped both; geometric
augmentation of the diffusion data or a 100x smaller KL weight changed nothing, and adaLN-zero init (DiT
paper) lowered the loss but left the labels unused after 500 steps (11 %).

Weights are saved in float16 (they load as float32) to keep the package small; the DiT's label-table rows
for classes 10-999 are never used and are zeroed so they compress.

Results on the shipped weights (CPU, 2 threads, shared machine; see the report printed at the end):

    classifier accuracy on the 359 held-out real digits        99.4 %   (on their VAE reconstructions: 99.2 %)
    Fréchet distance, train split vs held-out (real floor)        1.2
    digits-dit,  guidance 2.0, 25 DDIM steps, 1,000 images     99.7 %,  Fréchet distance 8.0
    digits-unet, guidance 2.0, 25 DDIM steps, 1,000 images     99.7 %,  Fréchet distance 3.1
    100 images (one call, 25 steps, CFG), 2 threads / 1 thread  DiT 8.3 s / 15.0 s, UNet 2.2 s / 3.4 s
    training: classifier 10 s, VAE 62 s, DiT 337 s, UNet 222 s: 10.5 min; weights 9.6 MiB (wheel: 7.8 MB)

    Fréchet distances use the classifier's 128-d penultimate features against the 359 held-out digits
    (torchmetrics' FrechetInceptionDistance with ``DigitFeatures`` gives the same values). The guidance
    sweep behind the default is in ``diffcache/models/__init__.py``.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    UNet2DModel,
)
from diffusers.models.embeddings import LabelEmbedding
from tqdm import tqdm

from diffcache import models
from diffcache.eval.metrics import frechet_distance
from diffcache.models import DigitClassifier, DigitFeatures, DigitsUNetPipeline, real_digits

NUM_TRAIN_TIMESTEPS = 1000
DIT_NULL_CLASS = 1000
UNET_NULL_CLASS = 10
NUM_CLASSES_USED = 10
SCHEDULER_CONFIG = {
    "num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
    "clip_sample": False, "set_alpha_to_one": True, "timestep_spacing": "trailing", "prediction_type": "epsilon",
}


def seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def augment(x: torch.Tensor, gen: torch.Generator, rot: float, scale: float, shift: float) -> torch.Tensor:
    """Random affine (degrees, relative scale, pixels) of ``(N, 1, 32, 32)`` images in [0, 1]."""
    n = len(x)

    def uniform() -> torch.Tensor:
        return torch.rand(n, generator=gen) * 2 - 1

    angle, s = uniform() * math.radians(rot), 1 + uniform() * scale
    tx, ty = uniform() * shift * 2 / x.shape[-1], uniform() * shift * 2 / x.shape[-1]
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save_fp16(model: torch.nn.Module, path: Path) -> None:
    copy.deepcopy(model).to(torch.float16).save_pretrained(path, safe_serialization=True)


# ---------------------------------------------------------------------------------------------------- parts


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int) -> DigitClassifier:
    gen = seeded(1)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch, n = 128, len(x)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 50))
    model.train()
    bar = tqdm(range(steps), desc="classifier")
    for _ in bar:
        idx = torch.randint(0, n, (batch,), generator=gen)
        xb = augment(x[idx], gen, rot=12, scale=0.12, shift=2.5)
        xb = (xb + 0.03 * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), norm_num_groups=32,
    )


def train_vae(x: torch.Tensor, steps: int, batch: int, kl_weight: float) -> AutoencoderKL:
    gen = seeded(2)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 20))
    vae.train()
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = augment(x[idx], gen, rot=10, scale=0.1, shift=2.0) * 2 - 1
        posterior = vae.encode(xb).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, xb)
        kl = posterior.kl().mean() / z[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(mse=f"{mse.item():.4f}", kl=f"{kl.item():.2f}")
    return vae.eval()


@torch.no_grad()
def encode(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of images in [0, 1]."""
    means, stds = [], []
    for i in range(0, len(x), 256):
        dist = vae.encode(x[i : i + 256] * 2 - 1).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def build_dit() -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=6,
        sample_size=8, patch_size=1, num_embeds_ada_norm=DIT_NULL_CLASS,
    )


def build_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=8, num_class_embeds=UNET_NULL_CLASS + 1,
    )


def train_denoiser(
    model: torch.nn.Module, name: str, latents: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    null_class: int, steps: int, batch: int, lr: float, seed: int, ema_decay: float = 0.995, p_null: float = 0.1,
) -> torch.nn.Module:
    """Epsilon-prediction training with classifier-free label dropout; returns the EMA model."""
    gen = seeded(seed)
    mean, std, labels = latents
    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    for module in model.modules():  # diffusers' DiT drops labels per block; we drop them per sample instead
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, 100))
    is_dit = isinstance(model, DiTTransformer2DModel)
    model.train()
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        z0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        y = labels[idx].clone()
        y[torch.rand(batch, generator=gen) < p_null] = null_class
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        pred = model(zt, timestep=t, class_labels=y).sample if is_dit else model(zt, t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


# ---------------------------------------------------------------------------------------------- evaluation


def torchmetrics_fid(classifier: DigitClassifier, real: torch.Tensor, fake: torch.Tensor) -> float | None:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None
    fid = FrechetInceptionDistance(feature=DigitFeatures(classifier), normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


@torch.no_grad()
def generate(pipe, labels: list[int], guidance: float, steps: int, seed: int) -> torch.Tensor:
    out = pipe(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="np").images
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()


def evaluate(name: str, classifier: DigitClassifier, real_feats: torch.Tensor, guidance: float, steps: int,
             per_class: int) -> dict:
    """Accuracy and Fréchet distance of ``per_class`` x 10 images (batches of 10 per class, seeds 0, 1, ...)."""
    pipe = models.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    images, labels = [], []
    for seed in range(max(1, per_class // 10)):
        batch_labels = [c for c in range(10) for _ in range(min(10, per_class))]
        images.append(generate(pipe, batch_labels, guidance, steps, seed))
        labels += batch_labels
    x, y = torch.cat(images), torch.tensor(labels)
    acc = float((classifier.predict(x) == y).float().mean())
    fd = frechet_distance(classifier.features(x), real_feats)
    return {"model": name, "guidance": guidance, "steps": steps, "n": len(x), "accuracy": acc, "fd": fd,
            "images": x}


def time_generation(name: str, guidance: float, steps: int, n: int = 100, threads: int | None = None) -> float:
    pipe = models.load_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    generate(pipe, [0] * 10, guidance, steps, 0)  # warm-up
    start = time.perf_counter()
    generate(pipe, [i % 10 for i in range(n)], guidance, steps, 0)
    elapsed = time.perf_counter() - start
    torch.set_num_threads(previous)
    return elapsed


def save_grid(images: torch.Tensor, path: Path, per_row: int = 10) -> None:
    from PIL import Image

    rows = [torch.cat(list(images[i : i + per_row, 0]), dim=1) for i in range(0, len(images), per_row)]
    grid = (torch.cat(rows, dim=0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(grid, mode="L").save(path)


# ---------------------------------------------------------------------------------------------------- main


def train(args: argparse.Namespace, out: Path) -> dict:
    timings: dict[str, float] = {}
    x_train, y_train = real_digits("train")
    x_test, y_test = real_digits("test")

    start = time.perf_counter()
    classifier = train_classifier(x_train, y_train, args.classifier_epochs)
    timings["classifier"] = time.perf_counter() - start
    print(f"classifier test accuracy: {(classifier.predict(x_test) == y_test).float().mean():.4f}")

    start = time.perf_counter()
    vae = train_vae(x_train, args.vae_steps, args.vae_batch, args.kl_weight)
    mean, std = encode(vae, x_train)
    samples = mean + std * torch.randn(mean.shape, generator=seeded(3))
    scaling = 1.0 / float(samples.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = (mean * scaling, std * scaling, y_train)
    timings["vae"] = time.perf_counter() - start
    with torch.no_grad():
        rec = (vae.decode(encode(vae, x_test)[0]).sample / 2 + 0.5).clamp(0, 1)
    print(f"vae: scaling_factor {scaling:.4f}, test mse {F.mse_loss(rec, x_test):.5f}, "
          f"classifier accuracy on reconstructions {(classifier.predict(rec) == y_test).float().mean():.4f}")

    start = time.perf_counter()
    dit = train_denoiser(build_dit(), "dit", latents, DIT_NULL_CLASS, args.dit_steps, args.dit_batch, args.dit_lr,
                         seed=4)
    timings["dit"] = time.perf_counter() - start
    start = time.perf_counter()
    unet = train_denoiser(build_unet(), "unet", latents, UNET_NULL_CLASS, args.unet_steps, args.unet_batch,
                          args.unet_lr, seed=5)
    timings["unet"] = time.perf_counter() - start

    with torch.no_grad():  # rows of never-used classes 10..999: zero, so the file compresses
        for module in dit.modules():
            if isinstance(module, LabelEmbedding):
                module.embedding_table.weight[NUM_CLASSES_USED:DIT_NULL_CLASS] = 0
    for sub in ("classifier", "vae", *models.MODEL_NAMES):  # only what this script writes
        shutil.rmtree(out / sub, ignore_errors=True)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    save_fp16(classifier, out / "classifier")
    save_fp16(vae, out / "vae")
    dit_pipe = DiTPipeline(transformer=copy.deepcopy(dit).half(), vae=vae, scheduler=scheduler,
                           id2label=models.ID2LABEL)
    dit_pipe.register_to_config(id2label={str(k): v for k, v in models.ID2LABEL.items()})
    _save_without_vae(dit_pipe, out / "digits-dit")
    unet_pipe = DigitsUNetPipeline(unet=copy.deepcopy(unet).half(), vae=vae, scheduler=scheduler)
    _save_without_vae(unet_pipe, out / "digits-unet")
    for path in out.rglob("*"):  # safetensors writes 0600 files; the package data must be world-readable
        path.chmod(0o755 if path.is_dir() else 0o644)
    return timings


def _save_without_vae(pipe, path: Path) -> None:
    """Saves a pipeline folder whose ``vae`` is the shared ``weights/vae`` (listed, not duplicated)."""
    pipe.save_pretrained(path, safe_serialization=True)
    shutil.rmtree(path / "vae")


@torch.no_grad()
def report(args: argparse.Namespace, out: Path, timings: dict | None) -> None:
    torch.set_num_threads(args.threads)
    classifier = models.load_classifier()
    x_test, y_test = real_digits("test")
    real_feats = classifier.features(x_test)
    accuracy = (classifier.predict(x_test) == y_test).float().mean()
    lines = [f"classifier accuracy on the {len(x_test)} held-out real digits: {accuracy:.4f}"]
    x_train, _ = real_digits("train")
    lines.append(f"Fréchet distance train split vs held-out (real vs real floor): "
                 f"{frechet_distance(classifier.features(x_train), real_feats):.2f}")
    for name in models.MODEL_NAMES:
        for guidance in args.sweep:
            r = evaluate(name, classifier, real_feats, guidance, models.NUM_INFERENCE_STEPS, per_class=20)
            lines.append(f"sweep {name} guidance {guidance}: accuracy {r['accuracy']:.3f}, FD {r['fd']:.2f} "
                         f"(n={r['n']})")
        r = evaluate(name, classifier, real_feats, models.GUIDANCE_SCALE, models.NUM_INFERENCE_STEPS,
                     per_class=args.per_class)
        tm = torchmetrics_fid(classifier, x_test, r["images"])
        if args.grid_dir:
            save_grid(r["images"][:100], args.grid_dir / f"{name}.png")
        lines.append(f"{name} guidance {models.GUIDANCE_SCALE}, {models.NUM_INFERENCE_STEPS} steps, n={r['n']}: "
                     f"accuracy {r['accuracy']:.4f}, FD {r['fd']:.2f} (torchmetrics FID {tm:.2f})")
        for threads in sorted({1, args.threads}):
            elapsed = time_generation(name, models.GUIDANCE_SCALE, models.NUM_INFERENCE_STEPS, threads=threads)
            lines.append(f"{name}: 100 images in {elapsed:.2f} s ({threads} thread(s))")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    lines.append(f"weights: {size / 2**20:.2f} MiB in {out}")
    if timings:
        lines.append("training time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
                     + f", total {sum(timings.values()) / 60:.1f} min")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=models.WEIGHTS_DIR,
                        help="weights folder (default: the package's); the evaluation needs the default")
    parser.add_argument("--skip-eval", action="store_true", help="train and save only")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--classifier-epochs", type=int, default=15)
    parser.add_argument("--vae-steps", type=int, default=200)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--kl-weight", type=float, default=1e-3)
    parser.add_argument("--dit-steps", type=int, default=1000)
    parser.add_argument("--dit-batch", type=int, default=64)
    parser.add_argument("--dit-lr", type=float, default=1.5e-3)
    parser.add_argument("--unet-steps", type=int, default=1200)
    parser.add_argument("--unet-batch", type=int, default=128)
    parser.add_argument("--unet-lr", type=float, default=1.5e-3)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--sweep", type=float, nargs="*", default=[1.0, 1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--grid-dir", type=Path, help="write a 10x10 sample grid per model (PNG) here")
    args = parser.parse_args()
    if args.out.resolve() != models.WEIGHTS_DIR and not args.skip_eval:
        parser.error("the evaluation loads the package's weights: add --skip-eval when --out is elsewhere")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    diffusers.utils.logging.set_verbosity_error()  # float16 casts for saving warn once per model
    timings = None
    if not args.eval_only:
        timings = train(args, args.out)
        print("training time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    if not args.skip_eval:
        report(args, models.WEIGHTS_DIR, timings)


if __name__ == "__main__":
    main()
