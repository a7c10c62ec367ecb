"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random Llama built from a config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

FAKE_CPU = Path(__file__).resolve().parent / "fake_cpu"
if os.environ.get("CAI_TEST_CPU"):  # run as another kind of CPU: see fake_cpu/sitecustomize.py
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FAKE_CPU), os.environ.get("PYTHONPATH")]))
    import runpy

    runpy.run_path(str(FAKE_CPU / "sitecustomize.py"))

EMBEDDED = "smollm2-135m"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny-model work is dominated by threading overhead; one thread is faster and steadier.
    End-to-end tests with the real model raise it again (see test_e2e.py)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The embedded model converted once to the cache (a no-op after the first run)."""
    from cai_bootstrap.models.embedded import prepare

    folder, _ = prepare(EMBEDDED)
    return folder


@pytest.fixture(scope="session")
def tokenizer(smollm2_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder)


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory, smollm2_folder) -> Path:
    """A 2-layer, hidden-64 random Llama with the real SmolLM2 tokenizer, saved like a real model."""
    from cai_bootstrap.models.tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_folder)
