"""``DigitsVideoPipeline``: class-conditional clips of moving digits with a latent ``WanTransformer3DModel``.

The denoiser is diffusers' Wan video transformer, unchanged, so every Wan code path of diffcache (block and
component caching, slicing) runs on a trained model. Each frame is one 4x8x8 latent of the shared digits
``AutoencoderKL``; the transformer sees ``(B, 4, F, 8, 8)``. The class reaches it where Wan expects text: a
one-token "prompt" whose embedding is the one-hot vector of the class (``text_dim`` >= 11; class 10 is the
null class of classifier-free guidance), so Wan's own text projection is the learned class table.

Like :class:`~diffcache.models.pipeline.DigitsUNetPipeline`, it keeps diffusers' loop: ``set_timesteps`` once
per generation, then per step one batched denoiser call (cond and null stacked) and one ``scheduler.step``.

Example::

    pipe = load_pipeline("digits-video")
    frames = pipe([3, 7], guidance_scale=VIDEO_GUIDANCE_SCALE, generator=torch.manual_seed(0)).frames
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, WanTransformer3DModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .digits import NUM_CLASSES
from .moving_digits import NUM_FRAMES
from .pipeline import OUTPUT_TYPES, DigitLabels, check_labels, step_kwargs

logger = logging.getLogger(__name__)

NULL_CLASS = NUM_CLASSES


@dataclass
class DigitsVideoPipelineOutput(BaseOutput):
    """``frames``: ``(B, F, H, W, 1)`` floats in [0, 1] (``"np"``), ``(B, F, 1, H, W)`` (``"pt"``), ``B`` lists
    of ``F`` grayscale images (``"pil"``) or ``(B, 4, F, 8, 8)`` latents (``"latent"``)."""

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]


def class_tokens(labels: torch.Tensor, text_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, text_dim)`` one-hot "prompt embeddings" of class ids (the null class included)."""
    return F.one_hot(labels, text_dim).to(dtype).unsqueeze(1)


class DigitsVideoPipeline(DigitLabels, DiffusionPipeline):
    """Class-conditional generation of ``F``-frame 32x32 clips of a moving digit.

    Args:
        transformer: ``WanTransformer3DModel`` over ``(B, 4, F, 8, 8)`` latents, ``text_dim`` > 10.
        vae: the per-frame autoencoder; latents are divided by ``vae.config.scaling_factor`` before decoding.
        scheduler: any diffusers scheduler the transformer's training schedule fits (epsilon prediction).
    """

    model_cpu_offload_seq = "transformer->vae"

    def __init__(self, transformer: WanTransformer3DModel, vae: AutoencoderKL,
                 scheduler: KarrasDiffusionSchedulers) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        """Class id of the unconditional token used for classifier-free guidance."""
        return NULL_CLASS

    @property
    def max_frames(self) -> int:
        """The longest clip the transformer's rotary table covers."""
        return self.transformer.config.rope_max_seq_len // self.transformer.config.patch_size[0]

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        num_frames: int = NUM_FRAMES,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> DigitsVideoPipelineOutput | tuple:
        """Generates one clip per class label.

        Args:
            class_labels: digit classes (0-9), one clip each.
            num_frames: frames per clip, 1 to :attr:`max_frames` (the model was trained on 8).
            guidance_scale: classifier-free guidance weight; guidance (and the doubled batch) is on when > 1.
            num_inference_steps: denoising steps.
            generator: seeds the initial latents (and stochastic schedulers).
            output_type: ``"np"``, ``"pt"``, ``"pil"`` or ``"latent"`` (see :class:`DigitsVideoPipelineOutput`).
            return_dict: return a :class:`DigitsVideoPipelineOutput` rather than a tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_frames, int) or not 1 <= num_frames <= self.max_frames:
            raise ValueError(f"num_frames must be an int from 1 to {self.max_frames} (the transformer's rotary "
                             f"table), got {num_frames!r}; the model was trained on {NUM_FRAMES}")
        device = self._execution_device
        dtype = self.transformer.dtype
        labels = check_labels(class_labels, self.null_class).to(device)
        batch_size = len(labels)
        do_cfg = guidance_scale > 1
        if do_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        tokens = class_tokens(labels, self.transformer.config.text_dim, dtype)
        size = self.vae.config.sample_size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (batch_size, self.transformer.config.in_channels, num_frames, size, size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        extra = step_kwargs(self.scheduler, generator)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = t.expand(model_input.shape[0])
            noise_pred = self.transformer(model_input, timestep, tokens, return_dict=False)[0]
            if do_cfg:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **extra).prev_sample

        frames = latents if output_type == "latent" else self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return DigitsVideoPipelineOutput(frames=frames)

    def decode(self, latents: torch.Tensor, output_type: str = "pt"
               ) -> np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]:
        """Frames of ``(B, C, F, h, w)`` latents, frame by frame through the VAE (``"pt"``, ``"np"`` or ``"pil"``)."""
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        decoded = self.vae.decode(flat / self.vae.config.scaling_factor).sample
        frames = (decoded / 2 + 0.5).clamp(0, 1).view(b, f, *decoded.shape[1:])
        if output_type == "pt":
            return frames
        array = frames.cpu().permute(0, 1, 3, 4, 2).float().numpy()
        if output_type == "np":
            return array
        return [self.numpy_to_pil(clip) for clip in array]
