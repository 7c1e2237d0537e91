"""The video default's parts: moving-digit clips, clip quality measures and ``DigitsVideoPipeline``.

The pipeline is checked on a tiny random ``WanTransformer3DModel`` (with the shipped VAE), so these tests
hold whether or not trained video weights are installed; the trained model's floor is tested where it ships.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, WanTransformer3DModel

import diffcache
from diffcache.models import DigitsVideoPipeline, load_classifier, load_vae, video_quality
from diffcache.models.moving_digits import MAX_SHIFT, NUM_FRAMES, centre_of_mass, moving_digits, random_paths, shift


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.fixture(scope="module")
def real_clips():
    clips, labels, paths = moving_digits("test", per_digit=1, seed=3)
    return clips[:200], labels[:200], paths[:200]


def tiny_pipe(seed: int = 0) -> DigitsVideoPipeline:
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=16).eval()
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                              timestep_spacing="trailing")
    pipe = DigitsVideoPipeline(transformer=transformer, vae=load_vae(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frames(pipe, labels=(3, 7), seed=0, **kwargs) -> np.ndarray:
    kwargs.setdefault("num_inference_steps", 4)
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).frames


def test_shift_moves_ink_by_the_offset():
    image = torch.zeros(1, 1, 32, 32)
    image[..., 12:20, 12:20] = 1
    moved = shift(image, torch.tensor([[2.0, -1.0]]))
    torch.testing.assert_close(centre_of_mass(moved) - centre_of_mass(image), torch.tensor([[2.0, -1.0]]),
                               atol=1e-4, rtol=0)


def test_paths_are_straight_constant_speed_and_bounded():
    paths = random_paths(50, torch.Generator().manual_seed(0))
    assert paths.shape == (50, NUM_FRAMES, 2)
    assert paths.abs().max() <= MAX_SHIFT
    steps = paths.diff(dim=1)
    torch.testing.assert_close(steps, steps[:, :1].expand_as(steps), atol=1e-5, rtol=0)
    assert steps.norm(dim=-1).mean() > 0.2  # they do move


def test_real_clips_score_as_real_and_shuffled_frames_do_not_move_straight(classifier, real_clips):
    clips, labels, paths = real_clips
    q = video_quality.clip_quality(clips, labels, classifier)
    assert q["frame_accuracy"] > 0.97 and q["clip_consistency"] > 0.95
    assert q["motion_residual"] < 0.2
    order = torch.tensor([0, 4, 1, 6, 2, 7, 3, 5])
    moving = (paths[:, -1] - paths[:, 0]).norm(dim=-1) > 2
    shuffled = video_quality.motion_residual(clips[moving][:, order])
    assert shuffled.mean() > 3 * video_quality.motion_residual(clips[moving]).mean()


def test_wrong_labels_lower_frame_accuracy_and_numpy_layout_is_accepted(classifier, real_clips):
    clips, labels, _ = real_clips
    wrong = (labels + 1) % 10
    assert video_quality.clip_quality(clips, wrong, classifier)["frame_accuracy"] < 0.05
    array = clips.permute(0, 1, 3, 4, 2).numpy()  # the pipeline's (N, F, H, W, 1)
    torch.testing.assert_close(video_quality.frame_predictions(array, classifier),
                               video_quality.frame_predictions(clips, classifier))


def test_clip_fd_is_small_between_real_sets_and_large_against_noise(classifier, real_clips):
    clips, labels, _ = real_clips
    other, _, _ = moving_digits("test", per_digit=1, seed=4)
    noise = torch.rand(200, NUM_FRAMES, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    real_fd = video_quality.clip_quality(other[:200], labels, classifier, clips)["fd"]
    noise_fd = video_quality.clip_quality(noise, labels, classifier, clips)["fd"]
    assert real_fd < noise_fd / 10


def test_pipeline_output_layouts_and_determinism():
    pipe = tiny_pipe()
    out = frames(pipe)
    assert out.shape == (2, NUM_FRAMES, 32, 32, 1) and out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, frames(pipe))
    pt = frames(pipe, output_type="pt")
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), out, atol=1e-6)
    assert frames(pipe, output_type="latent").shape == (2, 4, NUM_FRAMES, 8, 8)
    pil = frames(pipe, output_type="pil", num_frames=3)
    assert len(pil) == 2 and len(pil[0]) == 3 and pil[0][0].size == (32, 32)
    assert not np.allclose(frames(pipe, labels=(3, 3))[1], out[1])  # the class reaches the transformer


@pytest.mark.parametrize("num_frames", [0, 17, 2.5])
def test_a_frame_count_the_model_cannot_take_is_refused(num_frames):
    with pytest.raises(ValueError, match="num_frames must be an int from 1 to 16"):
        frames(tiny_pipe(), num_frames=num_frames)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="class_labels"):
        frames(tiny_pipe(), labels=(10,))


def test_saved_pipeline_loads_back_identically(tmp_path):
    pipe = tiny_pipe()
    pipe.save_pretrained(tmp_path)
    loaded = DigitsVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(frames(loaded), frames(pipe))


def test_wan_caching_runs_on_it_exactly_when_nothing_is_reused():
    pipe = tiny_pipe()
    full = frames(pipe, num_inference_steps=6)
    fast = diffcache.accelerate(pipe, "fora:interval=2")
    cached = frames(fast, num_inference_steps=6)
    assert not np.array_equal(cached, full)
    diffcache.restore(fast)
    np.testing.assert_array_equal(frames(pipe, num_inference_steps=6), full)
    none = diffcache.accelerate(pipe, "none")
    np.testing.assert_array_equal(frames(none, num_inference_steps=6), full)


def test_label_names_parse_like_the_image_defaults():
    pipe = tiny_pipe()
    assert pipe.get_label_ids(["3", "9"]) == [3, 9]
    from diffcache.loading import class_count

    assert class_count(pipe) == 10
