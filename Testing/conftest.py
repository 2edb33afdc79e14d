"""Shared fixtures: a tiny random CTFlow model on disk (real folder, real MiniLM text encoder) and its pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

OUTPUT = Path(__file__).parent / "_output"  # screenshots and other artefacts a person may want to look at


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import ctflow

    return ctflow.create_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model):
    import ctflow

    return ctflow.CTFlowPipeline.from_pretrained(tiny_model, device="cpu")


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT
