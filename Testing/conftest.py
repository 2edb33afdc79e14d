"""Shared fixtures: a tiny random CTFlow model on disk (real folder, real MiniLM text encoder) and its pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

OUTPUT = Path(__file__).parent / "_output"  # screenshots and other artefacts a person may want to look at


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model on a shared 2-core machine runs many times faster on one thread than on two
    (a module opts in with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
def steered(tiny_pipeline):
    """steered(end_block, end_frame, base=tiny_pipeline, **config): a copy of `base` (config fields replaced) whose
    denoiser is a stand-in that draws tissue, then white end slices from frame `end_frame` of block `end_block` on."""
    import dataclasses

    import ctflow
    import torch
    from ctflow.pipeline import END_HU

    class SteerTo(torch.nn.Module):
        """(z - target) / t is the exact rectified-flow velocity towards `target`, so every solver lands on it."""

        def __init__(self, autoencoder, end_block, end_frame):
            super().__init__()
            self.tissue = autoencoder.constant_latent(40.0)
            self.white = autoencoder.constant_latent(END_HU)
            self.end_block, self.end_frame, self.block = end_block, end_frame, -1
            self.first_slices = []
            self.x_embed = torch.nn.Linear(1, 1)  # gives the stand-in a dtype like the real model

        def prepare(self, previous, text, mask, first_slice):
            self.block += 1  # called once per block
            self.first_slices.append(float(first_slice))
            return None

        def forward(self, x, t, cond):
            target = self.tissue[:, None].expand(-1, x.shape[2], -1, -1).clone()  # [C, T, h, w]
            if self.block >= self.end_block:
                start = self.end_frame if self.block == self.end_block else 0
                target[:, start:] = self.white[:, None]
            return (x - target) / t.view(-1, 1, 1, 1, 1)

    def make(end_block, end_frame, base=tiny_pipeline, **config):
        copy = ctflow.CTFlowPipeline(dataclasses.replace(base.config, **config), base.denoiser, base.autoencoder,
                                     base.text_encoder, base.model_id, base.weights_sha256)
        copy.denoiser = SteerTo(base.autoencoder, end_block, end_frame)
        return copy

    return make
