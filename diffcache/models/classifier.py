"""A small CNN digit classifier: the feature extractor (FID-style) and fidelity judge of the digits models.

Its 128-d penultimate activations are the features for a Fréchet distance between generated and real
digits, and its accuracy on generated digits measures how well the class conditioning is followed. It was
trained on the train split of :func:`diffcache.models.digits.real_digits` only.

Inputs are images in [0, 1] (white digit on black). :func:`prepare` turns what pipelines return (numpy
``(N, H, W, C)`` arrays, PIL image lists, torch tensors, uint8 or float, 1 or 3 channels, any size) into the
float ``(N, 1, 32, 32)`` tensor the network expects; ``forward``/``features`` call it themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn

from .digits import IMAGE_SIZE, NUM_CLASSES

ImageBatch = torch.Tensor | np.ndarray | Image.Image | Sequence[Image.Image]


def prepare(images: ImageBatch, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Converts a batch of images to float32 ``(N, 1, size, size)`` in [0, 1].

    Accepts torch tensors ``(N, C, H, W)`` (channels-last too, or one ``(C, H, W)`` image), numpy arrays
    ``(N, H, W, C)`` (or ``(N, H, W)``, or one ``(H, W, C)`` image) or lists of them, float in [0, 1] or uint8
    in [0, 255], and PIL images or lists of them. Color images are averaged to grayscale; other sizes are
    resized bilinearly.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Image.Image):
        images = np.stack([np.asarray(im.convert("L")) for im in images])[..., None]
    elif isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    if isinstance(images, np.ndarray):
        array = images if images.ndim != 3 or images.shape[-1] in (1, 3, 4) else images[..., None]
        if array.ndim == 3:
            array = array[None]
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        x = images[None] if images.ndim == 3 else images
        if x.ndim == 4 and x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)  # channels-last tensor
    else:
        raise TypeError(f"expected a tensor, numpy array or PIL images, got {type(images).__name__}")
    if x.ndim != 4 or x.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected images with 1, 3 or 4 channels, got shape {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = x[:, :3].mean(dim=1, keepdim=True) if x.shape[1] > 1 else x
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0, 1)


class DigitClassifier(ModelMixin, ConfigMixin):
    """Three conv blocks (conv-BN-ReLU-pool) then a ``feature_dim`` penultimate layer and a linear head.

    Args:
        channels: output channels of the three conv blocks.
        feature_dim: size of the penultimate (feature) layer.
        num_classes: number of digit classes.
        dropout: dropout before the head (training only).
    """

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, int, int] = (16, 32, 64),
        feature_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.MaxPool2d(2)]
            c_in = c_out
        self.conv = nn.Sequential(*layers)
        spatial = IMAGE_SIZE // 2 ** len(channels)
        self.fc = nn.Linear(c_in * spatial * spatial, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: ImageBatch) -> torch.Tensor:
        """Penultimate activations ``(N, feature_dim)`` of images in [0, 1] (see :func:`prepare`)."""
        x = prepare(images).to(device=self.device, dtype=self.dtype)
        x = self.conv(x * 2 - 1)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, images: ImageBatch) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of images in [0, 1] (see :func:`prepare`)."""
        return self.head(self.drop(self.features(images)))

    @torch.no_grad()
    def predict(self, images: ImageBatch, batch_size: int = 512) -> torch.Tensor:
        """Predicted labels ``(N,)`` (int64), computed in eval mode without gradients."""
        was_training = self.training
        self.eval()
        x = prepare(images)
        preds = torch.cat([self(x[i : i + batch_size]).argmax(dim=1) for i in range(0, len(x), batch_size)])
        self.train(was_training)
        return preds.cpu()


class DigitFeatures(nn.Module):
    """The classifier's penultimate features as a frozen module, e.g. torchmetrics' FID ``feature`` argument.

    It stays in eval mode (``train()`` is a no-op) and runs without gradients; ``num_features`` tells
    torchmetrics the feature size. Pass images in [0, 1] (float) or [0, 255] (uint8), see :func:`prepare`.
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.config.feature_dim

    def train(self, mode: bool = True) -> DigitFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: ImageBatch) -> torch.Tensor:
        return self.classifier.features(images)
