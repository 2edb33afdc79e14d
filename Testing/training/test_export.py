"""Export: the end-of-volume calibration and a model folder that ctflow loads and generates from, with its card."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ctflow
from ctflow.config import DENOISER_PRESETS
from ctflow_train import export, finding_study, train_flow

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_end_tolerance_separates_white_from_real_frames():
    end = export.choose_tolerance({"white": [0.05, 0.08, 0.3], "content": [0.9, 1.2, 0.25]})
    assert end["reliable"] is False and end["tolerance"] == pytest.approx(0.125)  # one real frame in the white range
    end = export.choose_tolerance({"white": [0.1, 0.2], "content": [0.5, 0.7]})
    assert end == {"tolerance": pytest.approx(0.35), "accuracy": 1.0, "reliable": True}


def test_export_loads_in_ctflow_and_generates(tiny, data, vae_run, cache, tmp_path):
    flow = tmp_path / "flow"
    train_flow.train(tiny.flow_run(cache, flow, steps=3))
    figures = tmp_path / "figures.json"  # as evaluate and finding-study write them: figures plus long details
    figures.write_text(json.dumps({"seconds_per_128_slices": 12.5, "seams": {"ratio": 1.1, "volumes": [{"x": 1}]},
                                   "values": {"normal": [0.25]}, "reports": {"normal": "Findings: ABSENT-TEXT."}}))
    study = finding_study.FindingStudy(
        "model", 2, 0, 16, 1.0, "236 volumes", "12 patients",
        [finding_study.DetectorScore("emphysema", "present", [False, True], 236, 76, 0.7, 0.62, 0.75)], {},
        [finding_study.Response("writer", "emphysema", "emphysema", [0.875, 0.25], [0.125, 0.5], 1)], [],
        {"writer/normal": "Findings: ABSENT-TEXT."})
    findings = tmp_path / "findings.json"
    findings.write_text(study.to_json())
    parser = argparse.ArgumentParser()
    export.configure(parser)
    args = parser.parse_args(["--flow", str(flow), "--vae", str(vae_run[0]), "--cache", str(cache),
                              "--out", str(tmp_path / "model"), "--steps", "2", "--calibration-cases", "2", "--half",
                              "--evaluation", str(figures), str(findings)])
    folder = export.export(export.ExportRun.from_args(args))
    stored = load_file(folder / "model.safetensors")
    checkpoint = load_file(flow / "checkpoint.safetensors")
    ema = {k.removeprefix("ema/"): v for k, v in checkpoint.items() if k.startswith("ema/")}
    assert stored.keys() == ema.keys() and all(v.dtype == torch.float16 for v in stored.values())
    assert all(torch.equal(stored[k], ema[k].half()) for k in ema)  # the EMA weights, rounded to half
    config = json.loads((folder / "config.json").read_text())
    preset = DENOISER_PRESETS["tiny"]
    assert config["denoiser"]["hidden_size"] == preset.hidden_size and config["denoiser"]["latent_size"] == 8
    assert config["typical_slices"] == 14 and config["geometry"]["spacing"] == [2.0, 2.0, 2.5]
    assert config["end_tolerance"] > 0 and config["max_slices"] in (256, 14)  # 14: could not calibrate the end
    card = (folder / "README.md").read_text()
    assert "not for clinical use" in card and "PSNR" in card and "ONE real base anatomy" in card
    assert "Trained in 1 stage(s)" in card and "| flow | 3 |" in card and "| False | False | latents |" in card
    assert "slice position" in card and "pooled-text vector" not in card  # the card names only what the model has
    assert '- seconds_per_128_slices: 12.5' in card and '- seams: {"ratio": 1.1}' in card
    assert "ABSENT-TEXT" not in card and "0.25" not in card  # per-volume details stay in the JSON
    assert study.markdown().rstrip() in card
    assert "| writer | emphysema | hu 0.75 (0.7) | 1/2 | 0/2 | 1/2 | 1/2 |" in card
    assert "- responses" not in card and "0.875," not in card  # the study's tables, not its JSON
    warm = tmp_path / "warm"  # a run warm-started from the model folder: its half-precision EMA, in float32
    train_flow.train(tiny.flow_run(cache, warm, steps=1, init=folder, lr=0.0))
    started = load_file(warm / "checkpoint.safetensors")
    assert all(torch.equal(started[f"model/{k}"], v.float()) for k, v in stored.items())
    with pytest.raises(ctflow.CTFlowError, match="neither a flow run"):
        train_flow.train(tiny.flow_run(cache, tmp_path / "nowhere", steps=1, init=tmp_path))
    pipe = ctflow.CTFlowPipeline.from_pretrained(folder, device="cpu")
    volume = pipe.generate(ctflow.GenerationRequest("Findings: No pleural effusion.", slices=6, seed=1))
    assert volume.hu.shape == (6, tiny.SIZE, tiny.SIZE) and volume.hu.dtype == np.int16
    assert volume.provenance.prompt.endswith("Length: 6 slices\nSpacing: 2.5 mm")
