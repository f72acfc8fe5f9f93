"""Shared fixtures: tiny pipelines built from configs, saved once per session, loaded with from_pretrained."""

import os
import shutil
import tempfile
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The on-disk cache (base spectra, checked layers) of this session only: tests neither read a developer's cache
# nor write to ~/.cache, and the folder goes when the session ends (pytest_sessionfinish).
_SESSION_CACHE = tempfile.mkdtemp(prefix="ice-lightning-cache-")
os.environ["ICE_LIGHTNING_CACHE"] = _SESSION_CACHE
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def saved_pipeline(tmp_path_factory):
    """``saved_pipeline(kind) -> folder`` holding a tiny pipeline written with ``save_pretrained``."""
    from ice_lightning.demos.tiny import build_tiny_pipeline

    cache: dict[str, str] = {}

    def get(kind: str) -> str:
        if kind not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            build_tiny_pipeline(kind).save_pretrained(folder)
            cache[kind] = str(folder)
        return cache[kind]

    return get


@pytest.fixture
def load_pipeline(saved_pipeline):
    """``load_pipeline(kind)``: a fresh pipeline loaded through the real ``from_pretrained`` path."""
    from diffusers import DiffusionPipeline

    def load(kind: str):
        pipe = DiffusionPipeline.from_pretrained(saved_pipeline(kind))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


@pytest.fixture(scope="session")
def minilm_pipe(saved_pipeline):
    """One tiny SD pipeline around the real MiniLM encoder, shared by tests that undo what they erase."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(saved_pipeline("sd-minilm"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pytest_sessionfinish(session, exitstatus):
    """Remove this session's cache folder (created above, so ours to delete): a run leaves nothing in the temp dir."""
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
