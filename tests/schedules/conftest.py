"""Fixtures shared by the schedule tests."""

import pytest

from diffcache.testing import build_pipeline


@pytest.fixture
def dit():
    pipe = build_pipeline("dit")
    pipe.set_progress_bar_config(disable=True)
    return pipe
