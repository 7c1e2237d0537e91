"""The shipped ``digits-video`` weights: offline loading and the full model's quality floor (issue #20)."""

from __future__ import annotations

import torch

from diffcache import models
from diffcache.models import VIDEO_GUIDANCE_SCALE, VIDEO_STEPS, load_classifier, load_pipeline, video_quality
from diffcache.models.moving_digits import NUM_FRAMES, moving_digits


def test_shipped_video_default_loads_offline_in_float32():
    assert (models.pipeline_dir("digits-video") / "model_index.json").is_file()
    pipe = load_pipeline("digits-video")
    assert pipe.transformer.dtype == torch.float32 and type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_full_video_default_draws_the_asked_digit_in_at_least_90_percent_of_frames():
    pipe = load_pipeline("digits-video")
    pipe.set_progress_bar_config(disable=True)
    labels = [c for c in range(10) for _ in range(2)]
    clips = pipe(labels, guidance_scale=VIDEO_GUIDANCE_SCALE, num_inference_steps=VIDEO_STEPS,
                 generator=torch.Generator().manual_seed(123), output_type="pt").frames
    assert clips.shape == (20, NUM_FRAMES, 1, 32, 32)
    real, _, _ = moving_digits("test", per_digit=1, seed=11)
    quality = video_quality.clip_quality(clips, torch.tensor(labels), load_classifier(), real)
    assert quality["frame_accuracy"] >= 0.90, quality
    assert quality["clip_consistency"] >= 0.80, quality
