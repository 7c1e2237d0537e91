"""The embedded digits models: offline loading, determinism, fidelity floors and pipeline conventions."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline
from PIL import Image

from diffcache import models
from diffcache.models import (
    GUIDANCE_SCALE,
    MODEL_NAMES,
    NUM_INFERENCE_STEPS,
    DigitsUNetPipeline,
    load_classifier,
    load_pipeline,
    prepare,
    real_digits,
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def pipes():
    return {name: load_pipeline(name) for name in MODEL_NAMES}


def generate(pipe, labels, seed=0, steps=4, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("guidance_scale", GUIDANCE_SCALE)
    return pipe(class_labels=labels, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loads_offline_in_float32(name, no_network):
    pipe = load_pipeline(name)
    expected = DiTPipeline if name == "digits-dit" else DigitsUNetPipeline
    assert type(pipe) is expected
    assert all(p.dtype == torch.float32 for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters())
    assert pipe.get_label_ids(["3", "7"]) == [3, 7]
    assert pipe.vae.config.scaling_factor != 1.0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_same_images_and_labels_matter(name, pipes):
    pipe = pipes[name]
    a = generate(pipe, [1, 7])
    assert a.shape == (2, 32, 32, 1) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, generate(pipe, [1, 7]))
    b = generate(pipe, [4, 0])
    assert not np.array_equal(a[0], b[0]) and not np.array_equal(a[1], b[1])


def test_unet_pipeline_outputs_pil(pipes):
    pipe = pipes["digits-unet"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe([2, 5], num_inference_steps=2, generator=torch.manual_seed(0)).images
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (32, 32) for im in images)
    assert pipe([2], num_inference_steps=2, output_type="pt").images.shape == (1, 1, 32, 32)
    with pytest.raises(ValueError, match="class_labels"):
        pipe([10], num_inference_steps=2)


def test_unknown_name_lists_the_models():
    with pytest.raises(ValueError, match="digits-dit.*digits-unet"):
        load_pipeline("digits-gan")


def test_real_digits_split_is_fixed():
    x, y = real_digits("test")
    x_train, _ = real_digits("train")
    assert x.shape == (359, 1, 32, 32) and x_train.shape == (1438, 1, 32, 32)
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(torch.bincount(y), torch.tensor([36, 36, 35, 37, 36, 36, 36, 36, 35, 36]))
    assert torch.equal(real_digits("test")[0], x)
    with pytest.raises(ValueError, match="split"):
        real_digits("validation")


def test_classifier_accuracy_on_held_out_digits(classifier):
    x, y = real_digits("test")
    assert (classifier.predict(x) == y).float().mean() >= 0.95


def test_classifier_accepts_pipeline_outputs(classifier):
    x, _ = real_digits("test")
    x = x[:4]
    expected = classifier.features(x)
    as_numpy = x.permute(0, 2, 3, 1).numpy()
    assert torch.allclose(classifier.features(as_numpy), expected)
    assert torch.allclose(classifier.features(np.repeat(as_numpy, 3, axis=-1)), expected, atol=1e-5)
    pil = [Image.fromarray((im[..., 0] * 255).round().astype(np.uint8)) for im in as_numpy]
    assert torch.allclose(classifier.features(pil), expected, atol=0.05)
    assert prepare(torch.rand(2, 3, 64, 64)).shape == (2, 1, 32, 32)
    assert classifier.features(x).shape == (4, 128) and classifier(x).shape == (4, 10)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_generated_digits_are_recognised(name, pipes, classifier):
    labels = [c for c in range(10) for _ in range(5)]
    images = generate(pipes[name], labels, seed=0, steps=NUM_INFERENCE_STEPS)
    accuracy = (classifier.predict(images) == torch.tensor(labels)).float().mean()
    assert accuracy >= 0.8, f"{name}: {accuracy:.2f}"


def test_unet_pipeline_one_denoiser_call_and_one_step_per_step():
    pipe = load_pipeline("digits-unet")
    calls = {"unet": [], "set_timesteps": 0, "step": 0}
    pipe.unet.register_forward_pre_hook(lambda module, args: calls["unet"].append(args[0].shape[0]))
    set_timesteps, step = pipe.scheduler.set_timesteps, pipe.scheduler.step

    def counting_set_timesteps(*args, **kwargs):
        calls["set_timesteps"] += 1
        return set_timesteps(*args, **kwargs)

    def counting_step(*args, **kwargs):
        calls["step"] += 1
        return step(*args, **kwargs)

    pipe.scheduler.set_timesteps, pipe.scheduler.step = counting_set_timesteps, counting_step
    generate(pipe, [3, 8, 1], steps=5, guidance_scale=2.0)
    assert calls == {"unet": [6] * 5, "set_timesteps": 1, "step": 5}  # cond + null labels in one batch
    calls.update(unet=[], set_timesteps=0, step=0)
    generate(pipe, [3, 8, 1], steps=3, guidance_scale=1.0)
    assert calls == {"unet": [3] * 3, "set_timesteps": 1, "step": 3}


def test_defaults_are_exported():
    assert models.DEFAULT_MODEL in MODEL_NAMES
    assert 1.0 < GUIDANCE_SCALE <= 4.0 and NUM_INFERENCE_STEPS == 25
