"""Export: the end-of-volume calibration and a model folder that ctflow loads and generates from, with its card."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import ctflow
import ctflow.checksums
from ctflow.config import DENOISER_PRESETS, SamplingConfig
from ctflow.denoiser import STDiT
from ctflow.ending import white_frames
from ctflow.model_folder import read_config
from ctflow.report import Report
from ctflow.volume import Geometry, Volume
from ctflow_train import export, finding_study, latent_store, stages, train_flow
from ctflow_train.dataset import DatasetWriter
from ctflow_train.reports import normal_report
from ctflow_train.runtime import load_vae

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest
DEMO_VAE = Path(__file__).parents[2] / "Resources" / "Models" / "ctflow-demo" / "vae"
END_CALIBRATION = Path(__file__).parents[2] / "bench" / "end_calibration.py"


def test_end_tolerance_separates_white_from_real_frames():
    end = export.choose_tolerance({"white": [0.05, 0.08, 0.3], "content": [0.9, 1.2, 0.25]})
    assert end["reliable"] is False and end["tolerance"] == pytest.approx(0.125)  # one real frame in the white range
    end = export.choose_tolerance({"white": [0.1, 0.2], "content": [0.5, 0.7]})
    assert end == {"tolerance": pytest.approx(0.35), "accuracy": 1.0, "reliable": True}


class DrawsOneBlock(torch.nn.Module):
    """A denoiser that draws `block` [C, T, h, w] whatever it is given: on the straight path from noise to the block,
    the velocity at (z, t) is (z - block) / t. It stands in for a trained model whose end frames are known."""

    def __init__(self, block: torch.Tensor) -> None:
        super().__init__()
        self.block, self.config = block, types.SimpleNamespace(block_slices=block.shape[1], side_code=False,
                                                               side_map=False, reads_code=False)

    def prepare(self, previous, text, mask, first_slice, code=None):
        assert previous.shape[0] == text.shape[0] == mask.shape[0] == 2  # guided: [conditional; unconditional]
        return None

    def forward(self, z, t, cond):
        return (z - self.block) / t[:, None, None, None, None]


def test_end_calibration_labels_frames_by_what_the_decoder_draws_not_where_the_patient_ended(tiny, tmp_path):
    """The bundled 16x VAE decodes its white latent white, unlike the tiny one; the patient's scan ends at slice 30,
    but the model draws its end slices from frame 5 of that block: those, and only those, are the white frames."""
    data, rng = tmp_path / "data", np.random.default_rng(0)
    with DatasetWriter(data) as writer:
        hu = np.kron(tiny.volume(rng, 30), np.ones((1, 16, 16), np.int16))  # 30 real slices + 4 white, 256 x 256
        writer.add("p0", Volume(hu, Geometry((1.5, 1.5, 2.5)), None), Report("No effusion.", "Normal."), tiny.labels(0))
    latent_store.build_store(data, DEMO_VAE, tmp_path / "store", 0, 256, ctflow.ModelConfig().text,
                             log=lambda line: None)
    store = latent_store.LatentStore(tmp_path / "store")
    drawn = store.latents(0)[:16].clone()  # [T, C, h, w] real frames...
    drawn[5:] = store.end  # ...then white from frame 5 (the patient's own end is at frame 30 - 16 = 14)
    model = DrawsOneBlock(drawn.permute(1, 0, 2, 3))
    found = export.end_distances(model, load_vae(DEMO_VAE, 256), store, SamplingConfig(guidance=3),
                                 1, 0)
    assert len(found["white"]) == 11 and len(found["content"]) == 5
    assert max(found["white"]) < 0.1 < min(found["content"])  # the latent test's distance tells them apart
    end = export.choose_tolerance(found)
    assert end["reliable"]  # and the pipeline's own test, at that tolerance, finds exactly the frames drawn white
    assert white_frames(drawn.permute(1, 0, 2, 3), store.end, end["tolerance"], export.END_FRACTION).tolist() == \
        [False] * 5 + [True] * 11


def test_a_model_that_never_draws_an_end_slice_is_not_trusted_to_end_a_volume():
    assert export.choose_tolerance({"white": [], "content": [0.4, 2.0]}) == {
        "tolerance": 0.2, "accuracy": None, "reliable": False}
    with pytest.raises(ValueError, match="not white"):
        export.choose_tolerance({"white": [0.1], "content": []})


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
                              "--side-guidance", "8", "--finding-guidance", "1.5",
                              "--evaluation", str(figures), str(findings)])
    folder = export.export(export.ExportRun.from_args(args))
    assert str(vae_run[0]) not in (folder / "vae" / "config.json").read_text()  # no path of the exporting machine
    stored = load_file(folder / "model.safetensors")
    checkpoint = load_file(flow / "checkpoint.safetensors")
    ema = {k.removeprefix("ema/"): v for k, v in checkpoint.items() if k.startswith("ema/")}
    assert stored.keys() == ema.keys() and all(v.dtype == torch.float16 for v in stored.values())
    assert all(torch.equal(stored[k], ema[k].half()) for k in ema)  # the EMA weights, rounded to half
    config = json.loads((folder / "config.json").read_text())
    preset = DENOISER_PRESETS["tiny"]
    assert config["denoiser"]["hidden_size"] == preset.hidden_size and config["denoiser"]["latent_size"] == 8
    assert config["typical_slices"] == 14 and config["geometry"]["spacing"] == [2.0, 2.0, 2.5]
    assert config["sampling"]["side_guidance"] == 8 and config["sampling"]["finding_guidance"] == 1.5
    card = (folder / "README.md").read_text()
    assert config["end_tolerance"] > 0 and config["max_slices"] == 14  # the tiny VAE draws no white: capped
    assert ("calibrated on 2 blocks it generated at the end of training volumes (0 of their 8 frames drawn white by "
            "the decoder): the model drew no end slice, so volumes without a requested length stop at the typical 14 "
            "slices at most.") in card
    assert "not for clinical use" in card and "PSNR" in card and "side guidance 8.0, finding guidance 1.5." in card
    assert "normal_report" not in config and "this normal report" not in card  # not the synthetic cohort: none
    assert "ONE real base anatomy" not in card  # the tiny cases are not the synthetic cohort's patients
    assert "Trained in 1 stage(s)" in card and "| flow | 3 |" in card and "| False | False | 1.0 | latents |" in card
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
    assert volume.provenance.prompt.startswith("Findings: No pleural effusion.\n")  # its own words: no normal report
    assert volume.provenance.prompt.endswith("Length: 6 slices\nSpacing: 2.5 mm")


def exported(tiny, flow, vae_run, cache, out, *options):
    parser = argparse.ArgumentParser()
    export.configure(parser)
    args = parser.parse_args(["--flow", str(flow), "--vae", str(vae_run[0]), "--cache", str(cache), "--out", str(out),
                              "--steps", "1", "--calibration-cases", "1", *options])
    return export.export(export.ExportRun.from_args(args))


def test_the_end_calibration_bench_remakes_the_exports_calibration_from_the_folder(tiny, vae_run, cache, tmp_path):
    train_flow.train(tiny.flow_run(cache, tmp_path / "flow", steps=1))
    given = tmp_path / "normal.txt"
    given.write_text("Findings: Lungs clear. No effusion.\n\nImpressions: Normal chest.\n")
    folder = exported(tiny, tmp_path / "flow", vae_run, cache, tmp_path / "model",  # calibrated at 1 step, 1 case
                      "--normal-report", str(given))
    normal = "Findings: Lungs clear. No effusion.\nImpressions: Normal chest."
    assert json.loads((folder / "config.json").read_text())["normal_report"] == normal
    assert f'is drawn from this normal report (config.json\'s normal_report): "{normal}"' in (folder / "README.md").read_text()

    def bench(*args):
        return subprocess.run([sys.executable, str(END_CALIBRATION), "--model", str(folder), "--threads", "1", *args],
                              capture_output=True, text=True, timeout=300)

    refused = bench("--latents", str(tmp_path / "flow"), "--steps", "1")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].endswith(
        "is not a latent store (no store.json): make one with ctflow-train cache-latents"), refused.stderr
    result = bench("--latents", str(cache), "--steps", "1", "3", "--cases", "1", "--json", str(tmp_path / "end.json"))
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "end.json").read_text())["results"]
    config = json.loads((folder / "config.json").read_text())
    tolerance, frames = config["end_tolerance"], config["denoiser"]["block_slices"]  # one case: one block
    assert [row["steps"] for row in rows] == [1, 3] and [row["frames"] for row in rows] == [frames, frames]
    assert rows[0]["chosen_tolerance"] == pytest.approx(tolerance, rel=1e-6)  # export's choice, made again
    assert rows[0]["white"] == 0 and rows[0]["folder_other_hits"] == frames  # the tiny decoder draws no end slice
    assert rows[0]["lowest_other"] == pytest.approx(2 * tolerance, rel=1e-6)  # so export set it below every frame


def test_a_model_of_the_synthetic_cohort_alone_draws_a_report_of_no_finding_from_the_writer_s_normal_report():
    """Its reports were all the writer's; on other data the parser's eleven findings are not all a report can say,
    so a model draws its own words unless given a normal report."""
    writer = normal_report().text
    assert export.normal_report_of("", False, True) == writer and export.normal_report_of("", False, False) == ""
    assert export.normal_report_of("Findings: Clear.", False, False) == "Findings: Clear."
    assert export.normal_report_of("Findings: Clear.", True, True) == export.normal_report_of("", True, True) == ""
    assert "No emphysema." in writer and "Impressions:" in writer


@pytest.mark.parametrize("text", ["Findings: Small left pleural effusion.", "\n"])
def test_a_normal_report_that_reports_a_finding_is_refused_before_any_work(text, tmp_path):
    """A --normal-report file that reports a finding (or none at all) ends the export at once, before its minutes
    of calibration: the model folder would not load."""
    given = tmp_path / "normal.txt"
    given.write_text(text)
    parser = argparse.ArgumentParser()
    export.configure(parser)
    args = parser.parse_args(["--flow", str(tmp_path / "none"), "--vae", str(tmp_path / "none"), "--cache",
                              str(tmp_path / "none"), "--out", str(tmp_path / "model"), "--normal-report", str(given)])
    with pytest.raises(ctflow.CTFlowError, match="normal_report must be a report|the report is empty"):
        export.export(export.ExportRun.from_args(args))
    assert not (tmp_path / "model").exists()


def test_a_run_exports_as_the_weight_average_with_the_model_it_started_from(tiny, vae_run, cache, tmp_path):
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=2))
    start = exported(tiny, tmp_path / "first", vae_run, cache, tmp_path / "start", "--half")
    train_flow.train(tiny.flow_run(cache, tmp_path / "tuned", steps=2, init=start))
    soup = exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "soup", "--average-with", str(start),
                    "--run-share", "0.25")
    ema = {k.removeprefix("ema/"): v for k, v in load_file(tmp_path / "tuned" / "checkpoint.safetensors").items()
           if k.startswith("ema/")}
    began, stored = load_file(start / "model.safetensors"), load_file(soup / "model.safetensors")
    assert stored.keys() == ema.keys() and any(not torch.equal(ema[k], began[k].float()) for k in ema)
    assert all(torch.allclose(stored[k], 0.25 * ema[k] + 0.75 * began[k].float()) for k in ema)
    card = (soup / "README.md").read_text()
    sha = ctflow.checksums.read_manifest(start)["model.safetensors"]
    assert (f"EMA weights averaged with the model this training started from: 25% the last stage's, 75% those of "
            f"`{start}` (model.safetensors sha256 {sha[:16]}...).") in card
    assert [s["run"] for s in export.card_stages(soup / "README.md")] == ["first", "tuned"]
    pipe = ctflow.CTFlowPipeline.from_pretrained(soup, device="cpu")  # a model folder like any other
    assert pipe.generate(ctflow.GenerationRequest("Findings: Normal.", slices=4, seed=0)).hu.shape[0] == 4
    own = f"25% the last stage's, 75% those of `{start}` (model.safetensors sha256 {sha[:16]}...)"
    train_flow.train(tiny.flow_run(cache, tmp_path / "sibling", steps=1, init=start))
    nested = exported(tiny, tmp_path / "sibling", vae_run, cache, tmp_path / "nested", "--average-with", str(soup))
    soup_sha = ctflow.checksums.read_manifest(soup)["model.safetensors"]
    assert (f"those of `{soup}` (model.safetensors sha256 {soup_sha[:16]}...) (its own card: \"EMA weights averaged with "
            f"the model this training started from: {own}\").") in (nested / "README.md").read_text()

    train_flow.train(tiny.flow_run(cache, tmp_path / "other", steps=1))  # not where `tuned` started
    unrelated = exported(tiny, tmp_path / "other", vae_run, cache, tmp_path / "unrelated")
    with pytest.raises(ctflow.CTFlowError, match="neither a model this run started from nor a sibling's"):
        exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", "--average-with", str(unrelated))
    retrained = shutil.copytree(start, tmp_path / "retrained")  # the same denoiser over another autoencoder
    vae_file = retrained / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(vae_file)
    weights = {k: v + 1e-3 if k.startswith("decoder.") else v for k, v in weights.items()}
    save_file(weights, vae_file)
    ctflow.checksums.write_checksums(retrained)
    with pytest.raises(ctflow.CTFlowError, match="another autoencoder"):
        exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", "--average-with", str(retrained))
    with pytest.raises(ctflow.CTFlowError, match="already holds this run's weights"):  # the recipe run twice
        exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", "--average-with", str(soup))
    with pytest.raises(ctflow.CTFlowError, match="give --average-with too"):
        exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", "--run-share", "0.5")
    for share in ("nan", "1.5"):
        with pytest.raises(SystemExit):
            exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", "--average-with", str(start),
                     "--run-share", share)
    assert not (tmp_path / "no").exists()


def test_a_run_exports_with_the_report_reading_weights_of_the_model_it_started_from(tiny, vae_run, cache, tmp_path):
    """--text-from: the weights that read the report are the folder's, whole; every other weight stays the run's (or
    the average's); the card says whose, and an unrelated folder is refused as for --average-with."""
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=2))
    start = exported(tiny, tmp_path / "first", vae_run, cache, tmp_path / "start")
    train_flow.train(tiny.flow_run(cache, tmp_path / "tuned", steps=2, init=start))
    mixed = exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "mixed", "--text-from", str(start))
    soup = exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "soup", "--average-with", str(start),
                    "--run-share", "0.25", "--text-from", str(start))
    ema = {k.removeprefix("ema/"): v for k, v in load_file(tmp_path / "tuned" / "checkpoint.safetensors").items()
           if k.startswith("ema/")}
    began = load_file(start / "model.safetensors")
    readers = STDiT(read_config(start).denoiser).report_readers()
    assert any(".cross." in name for name in readers) and any(name.startswith("text_embed.") for name in readers)
    assert not any(".spatial." in name or ".temporal." in name or ".mlp." in name for name in readers)
    differ = {k for k in ema if not torch.equal(ema[k], began[k])}
    assert differ & readers and differ - readers  # training moved both kinds, so each check below can fail
    for folder, rest in ((mixed, lambda k: ema[k]), (soup, lambda k: 0.25 * ema[k] + 0.75 * began[k])):
        stored = load_file(folder / "model.safetensors")
        assert all(torch.equal(stored[k], began[k]) for k in readers)
        assert all(torch.allclose(stored[k], rest(k)) for k in ema.keys() - readers)
    sha = ctflow.checksums.read_manifest(start)["model.safetensors"]
    total = sum(v.numel() for v in ema.values())
    count = sum(ema[k].numel() for k in readers)
    assert (f"EMA weights; the weights that read the report (its embedders and every layer's cross-attention, "
            f"{count:,} of {total:,} parameters) taken whole from `{start}` (model.safetensors sha256 {sha[:16]}...).") \
        in (mixed / "README.md").read_text()
    assert (f"75% those of `{start}` (model.safetensors sha256 {sha[:16]}...); the weights that read the report"
            in (soup / "README.md").read_text())
    assert [s["run"] for s in export.card_stages(mixed / "README.md")] == ["first", "tuned"]
    pipe = ctflow.CTFlowPipeline.from_pretrained(mixed, device="cpu")  # a model folder like any other
    assert pipe.generate(ctflow.GenerationRequest("Findings: Normal.", slices=4, seed=0)).hu.shape[0] == 4

    train_flow.train(tiny.flow_run(cache, tmp_path / "other", steps=1))  # not where `tuned` started
    unrelated = exported(tiny, tmp_path / "other", vae_run, cache, tmp_path / "unrelated")
    with pytest.raises(ctflow.CTFlowError, match="--text-from .*neither a model this run started from"):
        exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", "--text-from", str(unrelated))
    with pytest.raises(ctflow.CTFlowError, match="--text-from .*already holds this run's weights"):
        exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", "--text-from", str(mixed))
    for option in ("--text-from", "--average-with"):  # a missing folder: which option's
        with pytest.raises(ctflow.CTFlowError, match=f"^{option}: .*missing"):
            exported(tiny, tmp_path / "tuned", vae_run, cache, tmp_path / "no", option, str(tmp_path / "missing"))
    assert not (tmp_path / "no").exists()


def test_a_run_exports_as_the_weight_average_with_a_siblings_export(tiny, vae_run, cache, tmp_path):
    """Two runs continue the same model; one is exported alone, the other averaged with that export. The card counts
    both stages, the sibling's marked as averaged in, and a run continued from the average keeps them."""
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=2))
    start = exported(tiny, tmp_path / "first", vae_run, cache, tmp_path / "start", "--half")
    train_flow.train(tiny.flow_run(cache, tmp_path / "control", steps=2, init=start))
    train_flow.train(tiny.flow_run(cache, tmp_path / "brief", steps=3, init=start, cond_noise=0.25))
    brief = exported(tiny, tmp_path / "brief", vae_run, cache, tmp_path / "brief_model", "--half")
    soup = exported(tiny, tmp_path / "control", vae_run, cache, tmp_path / "soup", "--average-with", str(brief))
    ema = {k.removeprefix("ema/"): v for k, v in load_file(tmp_path / "control" / "checkpoint.safetensors").items()
           if k.startswith("ema/")}
    theirs, stored = load_file(brief / "model.safetensors"), load_file(soup / "model.safetensors")
    assert all(torch.allclose(stored[k], 0.5 * ema[k] + 0.5 * theirs[k].float()) for k in ema)
    card = (soup / "README.md").read_text()
    sha = ctflow.checksums.read_manifest(brief)["model.safetensors"]
    assert ("EMA weights averaged with a sibling, the export of a run that started where the last stage did (stage "
            f"brief): 50% the last stage's, 50% those of `{brief}` (model.safetensors sha256 {sha[:16]}...).") in card
    listed = export.card_stages(soup / "README.md")
    assert [(s["run"], s["steps"], s["cond_noise"]) for s in listed] == [
        ("first", 2, 0.05), ("control", 2, 0.05), ("brief (averaged in)", 3, 0.25)]
    assert ("Trained in 3 stage(s), each warm-started from the one before but those averaged in, which started where "
            "the one before did: 7 steps") in card
    train_flow.train(tiny.flow_run(cache, tmp_path / "after", steps=1, init=soup))
    assert [s["run"] for s in export.lineage(tmp_path / "after")] == ["first", "control", "brief (averaged in)", "after"]

    train_flow.train(tiny.flow_run(cache, tmp_path / "grandchild", steps=1, init=brief))  # a stage too far
    nephew = exported(tiny, tmp_path / "grandchild", vae_run, cache, tmp_path / "nephew")
    with pytest.raises(ctflow.CTFlowError, match="neither a model this run started from nor a sibling's"):
        exported(tiny, tmp_path / "control", vae_run, cache, tmp_path / "no", "--average-with", str(nephew))
    train_flow.train(tiny.flow_run(cache, tmp_path / "scratch", steps=1))  # two runs from nothing share no start
    with pytest.raises(ctflow.CTFlowError, match="neither a model this run started from nor a sibling's"):
        exported(tiny, tmp_path / "scratch", vae_run, cache, tmp_path / "no", "--average-with", str(start))
    assert not (tmp_path / "no").exists()


def test_a_run_started_from_a_model_folder_keeps_the_stages_of_its_card(tiny, vae_run, cache, tmp_path):
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=2))
    train_flow.train(tiny.flow_run(cache, tmp_path / "second", steps=1, init=tmp_path / "first", cond_noise=0.25))
    bundled = exported(tiny, tmp_path / "second", vae_run, cache, tmp_path / "bundled")
    train_flow.train(tiny.flow_run(cache, tmp_path / "third", steps=3, init=bundled, slice_position=True))
    earlier = export.card_stages(bundled / "README.md")
    assert [(s["run"], s["steps"], s["cond_noise"]) for s in earlier] == [("first", 2, 0.05), ("second", 1, 0.25)]
    stages = [{k: v for k, v in stage.items() if k != "stores"} for stage in export.lineage(tmp_path / "second")]
    assert earlier == stages  # the card's table reads back as the stages it was made of (store paths are not in it)
    card = (exported(tiny, tmp_path / "third", vae_run, cache, tmp_path / "again") / "README.md").read_text()
    stages = export.card_stages(tmp_path / "again" / "README.md")
    assert [(s["run"], s["steps"], s["slice_position"]) for s in stages] == [
        ("first", 2, False), ("second", 1, False), ("third", 3, True)]
    minutes = sum(s["minutes"] for s in stages)
    assert f"Trained in 3 stage(s), each warm-started from the one before: 6 steps, {minutes:.0f} min in all" in card
    assert "not found" not in card


def test_a_resumed_run_keeps_its_start_and_the_start_counts_as_it_was(tiny, vae_run, cache, tmp_path):
    """A resume need not name --init again; a flow run started from, continued after, counts its steps then."""
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=2))
    train_flow.train(tiny.flow_run(cache, tmp_path / "second", steps=2, init=tmp_path / "first"))
    train_flow.train(tiny.flow_run(cache, tmp_path / "second", steps=4, resume=True))  # without --init
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=4, resume=True))  # after `second` began
    stages = export.lineage(tmp_path / "second")
    assert [(s["run"], s["steps"]) for s in stages] == [("first", 2), ("second", 4)]


def test_a_model_folder_replaced_after_a_run_started_from_it_leaves_that_runs_stages_as_they_were(
        tiny, vae_run, cache, tmp_path, monkeypatch):
    """The usual --init is the bundled model, and the bundle is what an export of the new run replaces."""
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=2))
    bundle = exported(tiny, tmp_path / "first", vae_run, cache, tmp_path / "bundle")
    train_flow.train(tiny.flow_run(cache, tmp_path / "second", steps=1, init=bundle))
    newer = exported(tiny, tmp_path / "second", vae_run, cache, tmp_path / "newer")
    shutil.copy(newer / "README.md", bundle / "README.md")  # the bundle is now the model trained from it

    def runs():
        return [stage["run"] for stage in export.lineage(tmp_path / "second")]

    assert runs() == ["first", "second"]
    (bundle / "README.md").write_text("# another model\n")  # or an unrelated one
    assert runs() == ["first", "second"]  # the stages recorded when `second` started
    recorded = export.read_meta  # a run from before they were recorded: the card as it is, up to this chain
    monkeypatch.setattr(export, "read_meta",
                        lambda path: {k: v for k, v in recorded(path).items() if k != "init_stages"})
    shutil.copy(newer / "README.md", bundle / "README.md")
    assert runs() == ["first", "second"]


def test_the_card_counts_the_patients_of_every_store_the_stages_trained_on(tiny, vae_run, cache, tmp_path):
    more = tmp_path / "more"  # a twin of a patient the first store holds, and a new patient
    rng = np.random.default_rng(1)
    with DatasetWriter(more) as writer:
        for name in ("tiny_1_with_left_consolidation", "tiny_9"):
            writer.add(name, Volume(tiny.volume(rng, 14), Geometry((2.0, 2.0, 2.5)), None),
                       Report(findings="Left consolidation.", impressions=""), tiny.labels(1))
    store = tmp_path / "more_latents"
    latent_store.build_store(more, vae_run[0] / "vae", store, 0, tiny.SIZE, ctflow.ModelConfig().text,
                             log=lambda line: None)
    names = latent_store.LatentStore(cache).names
    train_flow.train(tiny.flow_run(cache, tmp_path / "first", steps=1))
    second = dataclasses.replace(tiny.flow_run(cache, tmp_path / "second", steps=1, init=tmp_path / "first"),
                                 cache=[cache, store])
    train_flow.train(second)
    card = (exported(tiny, tmp_path / "second", vae_run, cache, tmp_path / "model") / "README.md").read_text()
    assert "tiny_1" in names and "tiny_9" not in names  # so the twin adds a volume, not a patient
    assert f"- {len(names) + 1} patients in {len(names) + 2} volumes (latent stores latents, more_latents)." in card
    shutil.rmtree(store)
    card = (exported(tiny, tmp_path / "second", vae_run, cache, tmp_path / "again") / "README.md").read_text()
    assert (f"- {len(names)} patients in {len(names)} volumes (latent stores latents; not counted, not here: "
            "more_latents).") in card
    later = tmp_path / "later"  # a run from the model folder: its card names the stores of the stages before
    train_flow.train(tiny.flow_run(cache, later, steps=1, init=tmp_path / "model"))
    card = (exported(tiny, later, vae_run, cache, tmp_path / "latest") / "README.md").read_text()
    assert (f"- {len(names)} patients in {len(names)} volumes (latent stores latents; not counted, not here: "
            "more_latents).") in card  # never silently fewer


def test_only_a_model_of_the_synthetic_cohort_says_it_saw_one_anatomy():
    """A CT-RATE model's card must not claim the demo cohort's one anatomy, nor a demo model's card lose it."""
    assert export.is_cohort_patient(export.patient_of("synth_2_00017_with_left_pleural_effusion"))
    assert not export.is_cohort_patient(export.patient_of("train_12_a_1"))
    cohort, scans = export.TrainingData(3, 4, ["latents"], [], True), export.TrainingData(3, 4, ["ctrate"], [], False)
    assert "ONE real base anatomy" in cohort.line() and "One base anatomy" in " ".join(cohort.limits())
    assert scans.line() == "- 3 patients in 4 volumes (latent stores ctrate)."
    assert not any("anatomy" in line or "synthetic drawings" in line for line in scans.limits())


def test_a_model_folder_without_a_stage_table_is_a_stage_not_found(tmp_path):
    assert stages.card_stages(tmp_path / "README.md") == []  # no card
    (tmp_path / "README.md").write_text("# a model\n\n## Training stages\n\nTrained elsewhere.\n")
    assert stages.card_stages(tmp_path / "README.md") == []  # no table
    row = ("| a | 12 | 1.5 | cpu x1 | 4 | 0.001 | 0.1 | 0.5 | 4 | 0.2 | 0.5 | 0.3 | 0.05 | 1.0 | 2.0 | False | False | False "
           "| False | False | False | False | True | 1.0 | latents |")
    table = ["## Training stages", "", "| " + " | ".join(c.header for c in stages.STAGE_COLUMNS) + " |",
             "|" + "---|" * len(stages.STAGE_COLUMNS), row, f"| gone | {stages.MISSING_STAGE} |" + "|" * (len(stages.STAGE_COLUMNS) - 2), "",
             "## Limits", "| not | a | stage |"]
    (tmp_path / "README.md").write_text("\n".join(table) + "\n")
    a, gone = stages.card_stages(tmp_path / "README.md")
    assert a == {"run": "a", "steps": 12, "minutes": 1.5, "device": "cpu x1", "batch": 4, "lr": 0.001,
                 "cond_noise": 0.1, "rollout_p": 0.5, "rollout_steps": 4, "end_p": 0.2, "finding_p": 0.5, "variant_p": 0.3, "pair_weight": 0.05,
                 "region_weight": 1.0, "seam_weight": 2.0, "slice_position": False, "pooled_text": False,
                 "seam_context": False, "side_code": False, "side_map": False, "lobe_map": False, "finding_code": False,
                 "finding_map": True, "code_lr": 1.0, "caches": ["latents"]}
    assert gone == {"run": "gone", "missing": True}
    assert stages.stage_table([a, gone]) == table[2:6]  # what it reads is what the card writes
    (tmp_path / "README.md").write_text("\n".join(table).replace("| 12 |", "| twelve |") + "\n")
    assert stages.card_stages(tmp_path / "README.md") == []  # edited by hand: nothing counted rather than a guess
