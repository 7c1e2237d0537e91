"""Testing utilities: tiny offline random-weight diffusers pipelines."""

from diffcache.testing.pipelines import (
    BENCH_PIPELINE_NAMES,
    PIPELINE_NAMES,
    SIZES,
    build_pipeline,
    call_kwargs,
    image_size,
)

__all__ = ["BENCH_PIPELINE_NAMES", "PIPELINE_NAMES", "SIZES", "build_pipeline", "call_kwargs", "image_size"]
