"""Shared fixtures of the model-training tests: a tiny prepared folder, a VAE trained on it and its latent store.

The folder (16x16 slices, white end slices, Findings/Impressions reports, label files) is written with the data
package's own writer; the tiny VAE and denoiser presets keep every training to seconds. Built once a session.
`tiny` holds the sizes and the helpers that make options, volumes and batches of that size.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import ctflow
from ctflow.config import ModelConfig
from ctflow.report import Report
from ctflow.volume import Geometry, Volume
from ctflow_train import latent_store, train_flow, train_vae
from ctflow_train.dataset import DatasetWriter
from ctflow_train.findings import CODES, FINDINGS
from ctflow_train.flow_data import Batch, BlockDataset, SamplingRules, collate
from ctflow_train.latent_store import open_stores

STUDIED_PARAMETERS = {  # as the cohort's label files give them
    "emphysema": {"severity": "moderate", "low_attenuation_fraction": 0.2},
    "pleural_effusion": {"side": "right", "grade": "small", "depth_mm": 8.8, "volume_ml": 39},
    "consolidation": {"lobe": "right lower lobe", "air_bronchogram": True, "volume_ml": 34, "centre_kji": [6, 8, 5]},
    "cardiomegaly": {"scale": 1.16, "cardiothoracic_ratio": 0.61},
}


class Tiny:
    """Sizes of the tiny data and models, and the helpers that make inputs of those sizes."""

    SIZE, BLOCK = 16, 4  # slice rows = columns; slices per denoiser block

    @staticmethod
    def volume(rng: np.random.Generator, slices: int) -> np.ndarray:
        """int16 [slices + 4 white, 16, 16]: air, a soft-tissue body, two dark lungs whose size changes along z."""
        size = Tiny.SIZE
        j, i = np.mgrid[:size, :size]
        hu = np.full((slices + 4, size, size), -1000, np.int16)
        for k in range(slices):
            body = (j - 8) ** 2 / 36 + (i - 8) ** 2 / 49 < 1
            lung_r = 1.5 + 2 * np.sin(np.pi * k / slices) + rng.uniform(-0.3, 0.3)
            lungs = ((j - 8) ** 2 + (i - 5) ** 2 < lung_r**2) | ((j - 8) ** 2 + (i - 11) ** 2 < lung_r**2)
            hu[k][body] = 40
            hu[k][lungs] = -850
        hu[slices:] = 1000
        return hu

    @staticmethod
    def effusion(hu: np.ndarray) -> np.ndarray:
        """Fluid (10 HU) drawn into the back of the right lung of slices 4-9 of a Tiny.volume, in place; returns its
        finding mask (uint8 [content slices, H, W], findings.CODES) as the cohort writes it."""
        mask = np.zeros((len(hu) - 4, *hu.shape[1:]), np.uint8)
        j = np.arange(hu.shape[1])[:, None]
        i = np.arange(hu.shape[2])[None, :]
        mask[4:10] = (hu[4:10] == -850) & (j >= 8) & (i < 8)
        hu[:-4][mask > 0] = 10
        return mask * CODES["pleural_effusion"]

    @staticmethod
    def labels(n: int) -> dict:
        """Every finding absent but the studied ones, which alternate (pleural effusion as the report says); sided
        findings are on the right in patients 0 and 1, on the left in 2 and 3."""
        findings = {finding.name: {"present": False} for finding in FINDINGS}
        for k, name in enumerate(STUDIED_PARAMETERS):
            if (n + k + 1) % 2:
                where = "right" if n < 2 else "left"
                findings[name] = {"present": True, **Tiny.on_side(STUDIED_PARAMETERS[name], where)}
        return {"name": f"tiny_{n}", "synthetic": True, "findings": findings}

    @staticmethod
    def on_side(params: dict, where: str) -> dict:
        """The parameters with the finding moved to side `where` (its side, or its lobe's)."""
        if "side" in params:
            return {**params, "side": where}
        return {**params, "lobe": params["lobe"].replace("right", where)} if "lobe" in params else params

    @staticmethod
    def vae_run(data, out, **overrides) -> train_vae.VAERun:
        parser = argparse.ArgumentParser()
        train_vae.configure(parser)
        args = parser.parse_args(["--data", str(data), "--out", str(out), "--preset", "tiny", "--size", str(Tiny.SIZE),
                                  "--crop", str(Tiny.SIZE), "--steps", "6", "--batch", "4", "--adv-start", "3",
                                  "--holdout", "1", "--warmup", "1", "--eval-slices", "8", "--eval-every", "1"])
        return dataclasses.replace(train_vae.VAERun.from_args(args), **overrides)

    @staticmethod
    def flow_run(cache, out, **overrides) -> train_flow.FlowRun:
        parser = argparse.ArgumentParser()
        train_flow.configure(parser)
        args = parser.parse_args(["--cache", str(cache), "--out", str(out), "--preset", "tiny", "--block",
                                  str(Tiny.BLOCK), "--batch", "3", "--steps", "4", "--warmup", "1", "--lr", "1e-3",
                                  "--save-every", "2", "--workers", "0"])
        return dataclasses.replace(train_flow.FlowRun.from_args(args), **overrides)

    @staticmethod
    def latent_store(vae_run, folder, volumes: dict[str, np.ndarray], labels: dict[str, dict] | None = None,
                     variants: int = 0) -> Path:
        """A latent store of these volumes (name -> HU), each with a report that names it, encoded by the tiny VAE; the
        label files `labels` gives (name -> findings), else patient 0's."""
        with DatasetWriter(folder / "data") as writer:
            for name, hu in volumes.items():
                report = Report(findings=f"{name.replace('_', ' ')}.", impressions="Normal.")
                record = {**Tiny.labels(0), "findings": (labels or {}).get(name, Tiny.labels(0)["findings"])}
                writer.add(name, Volume(hu, Geometry((2.0, 2.0, 2.5)), None), report, record)
        latent_store.build_store(folder / "data", vae_run[0] / "vae", folder / "latents", 0, Tiny.SIZE,
                                 ModelConfig().text, variants=variants, log=lambda line: None)
        return folder / "latents"

    @staticmethod
    def draw(cache, n, seed=0, first=0, **rules) -> Batch:
        """Samples first..first+n-1 of a run over the store, as one batch."""
        dataset = BlockDataset(open_stores([cache]), SamplingRules(Tiny.BLOCK, **rules), seed)
        return collate([dataset[p] for p in range(first, first + n)])

    @staticmethod
    def store_of_another_vae(cache, folder: Path, shift=1.0) -> Path:
        """A copy of the store whose start latent differs by `shift`: 1 as another VAE would encode the start slice,
        1e-3 as the same VAE run with other thread counts does."""
        other = shutil.copytree(cache, folder / f"other_{shift}")
        common = load_file(other / "common.safetensors")
        common["start"] = common["start"] + shift
        save_file(common, other / "common.safetensors")
        return other


@pytest.fixture(scope="session")
def tiny() -> type[Tiny]:
    return Tiny


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with DatasetWriter(folder) as writer:
        for n in range(4):
            report = Report(findings=f"Patient {n}. {'Pleural effusion.' if n % 2 else 'No pleural effusion.'}",
                            impressions="Normal." if n % 2 == 0 else "Effusion.")
            hu = Tiny.volume(rng, 14)
            mask = Tiny.effusion(hu) if n % 2 else np.zeros((14, *hu.shape[1:]), np.uint8)  # as the report says
            writer.add(f"tiny_{n}", Volume(hu, Geometry((2.0, 2.0, 2.5)), None), report, Tiny.labels(n), mask)
    return folder


@pytest.fixture(scope="session")
def vae_run(data, tmp_path_factory):
    """(folder, metrics) of a finished 6-step VAE run on `data`."""
    out = tmp_path_factory.mktemp("vae")
    return out, train_vae.train(Tiny.vae_run(data, out))


@pytest.fixture(scope="session")
def cache(data, vae_run, tmp_path_factory):
    """The latent store of `data`'s training patients, encoded by `vae_run`'s VAE."""
    path = tmp_path_factory.mktemp("cache") / "latents"
    latent_store.build_store(data, vae_run[0] / "vae", path, 1, Tiny.SIZE, ctflow.ModelConfig().text,
                             log=lambda line: None)
    return path


@pytest.fixture(scope="session")
def twin_store(tiny, vae_run, tmp_path_factory):
    """Two patients, the first with two twins (a finding flipped, one moved to a side), named as `cohort` names them."""
    rng = np.random.default_rng(5)
    names = ("synth_0_00000", "synth_0_00000_with_emphysema", "synth_0_00000_with_right_consolidation", "synth_0_00001")
    return tiny.latent_store(vae_run, tmp_path_factory.mktemp("twins"), {n: tiny.volume(rng, 14) for n in names})
