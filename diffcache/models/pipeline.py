"""``DigitsUNetPipeline``: class-conditional latent diffusion with a ``UNet2DModel`` (diffusers has none).

It follows diffusers' pipeline conventions exactly, so diffcache's executor sees it like any other pipeline:
``scheduler.set_timesteps`` once per generation, then per step ONE batched denoiser call (cond and null
labels stacked for classifier-free guidance) and one ``scheduler.step``. The UNet's last class embedding
(``num_class_embeds - 1``) is the null class.

Example::

    pipe = DigitsUNetPipeline.from_pretrained(path)
    images = pipe([3, 7], guidance_scale=2.5, generator=torch.manual_seed(0)).images
"""

from __future__ import annotations

import inspect
import logging

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_labels(class_labels: int | list[int] | torch.Tensor, null_class: int) -> torch.Tensor:
    """Class labels as a 1-d long tensor; ``ValueError`` unless non-empty and all in ``[0, null_class)``."""
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= null_class:
        raise ValueError(f"class_labels must be a non-empty list of ints in [0, {null_class}), got "
                         f"{labels.tolist()}")
    return labels


def step_kwargs(scheduler: KarrasDiffusionSchedulers, generator: torch.Generator | list[torch.Generator] | None
                ) -> dict:
    """``scheduler.step``'s extra keywords: the generator, for the schedulers that take one."""
    accepted = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in accepted else {}


class DigitLabels:
    """Label names of a digits pipeline with a ``null_class`` property, like ``DiTPipeline.labels``."""

    null_class: int

    @property
    def labels(self) -> dict[str, int]:
        """Label names to class ids (``"0"`` .. ``"9"``)."""
        return {str(i): i for i in range(self.null_class)}

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of label names (``"3"`` -> 3)."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [n for n in names if n not in self.labels]
        if unknown:
            raise ValueError(f"unknown labels {unknown}; expected some of {list(self.labels)}")
        return [self.labels[n] for n in names]


class DigitsUNetPipeline(DigitLabels, DiffusionPipeline):
    """Class-conditional generation of 32x32 digits with a latent ``UNet2DModel`` and an ``AutoencoderKL``.

    Args:
        unet: class-conditional denoiser (``num_class_embeds`` = classes + 1, the last one is the null class).
        vae: autoencoder; latents are divided by ``vae.config.scaling_factor`` before decoding.
        scheduler: any diffusers scheduler the UNet's training schedule fits (epsilon prediction).
    """

    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DModel, vae: AutoencoderKL, scheduler: KarrasDiffusionSchedulers) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        """Class id of the unconditional embedding used for classifier-free guidance."""
        return self.unet.config.num_class_embeds - 1

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generates one image per class label.

        Args:
            class_labels: digit classes (0-9), one image each.
            guidance_scale: classifier-free guidance weight; guidance (and the doubled batch) is on when > 1.
            num_inference_steps: denoising steps.
            generator: seeds the initial latents (and stochastic schedulers).
            output_type: ``"pil"`` (list of grayscale ``PIL.Image``), ``"np"`` (float ``(N, 32, 32, 1)`` in
                [0, 1]), ``"pt"`` (``(N, 1, 32, 32)`` tensor in [0, 1]) or ``"latent"``.
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        device = self._execution_device
        labels = check_labels(class_labels, self.null_class).to(device)
        do_cfg = guidance_scale > 1
        if do_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        batch_size = len(labels) // 2 if do_cfg else len(labels)
        size = self.unet.config.sample_size
        shape = (batch_size, self.unet.config.in_channels, size, size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        extra = step_kwargs(self.scheduler, generator)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(model_input, t, class_labels=labels).sample
            if do_cfg:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, **extra).prev_sample

        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
            images = (decoded / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
