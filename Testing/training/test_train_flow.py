"""Flow-matching training of the denoiser: rollout of previous blocks, a falling loss, bit-for-bit resume, warm
starts and the seam context.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ctflow
from ctflow.denoiser import STDiT
from ctflow.sampling import Guidance, block_velocity, sample
from ctflow_train import export, train_flow
from ctflow_train.checkpoint import read_meta
from ctflow_train.flow_data import noises
from ctflow_train.latent_store import LatentStore

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_rollout_replaces_only_previous_blocks_that_follow_real_slices(tiny, cache):
    torch.manual_seed(0)
    model = STDiT(train_flow.denoiser_config(tiny.flow_run(cache, "unused"), LatentStore(cache))).eval()
    batch = tiny.draw(cache, 8, seed=2)
    noise = noises(batch, torch.device("cpu"), rollout=True).rollout
    assert batch.first.any() and not batch.first.all()
    rolled = train_flow.roll_out_previous(model, batch, 1.0, noise)
    assert rolled.shape == batch.previous.shape and torch.isfinite(rolled).all()
    for i in range(8):  # a first block's previous is the exact start block; every other one is the model's estimate
        assert torch.equal(rolled[i], batch.previous[i]) == bool(batch.first[i])
    untouched = train_flow.roll_out_previous(model, batch, 0.0, noise)
    assert torch.equal(untouched, batch.previous)
    some = train_flow.roll_out_previous(model, batch, 0.5, noise)  # where its uniform draw is below the share
    kept = batch.first | (batch.rollout_u >= 0.5)
    assert all(torch.equal(some[i], batch.previous[i]) == bool(kept[i]) for i in range(8))


def test_a_rollout_of_several_steps_is_the_block_generation_would_make_from_that_noise(tiny, cache):
    torch.manual_seed(0)
    run = tiny.flow_run(cache, "unused", slice_position=True)
    model = STDiT(train_flow.denoiser_config(run, LatentStore(cache))).eval()
    batch = tiny.draw(cache, 8, seed=2)
    noise = noises(batch, torch.device("cpu"), rollout=True).rollout
    rolled = train_flow.roll_out_previous(model, batch, 0.5, noise, steps=3)
    chosen = ~batch.first & (batch.rollout_u < 0.5)
    assert chosen.any() and not chosen.all()
    for i in range(8):
        if not chosen[i]:
            assert torch.equal(rolled[i], batch.previous[i])
            continue
        first_slice = int(batch.first_slice[i]) - tiny.BLOCK  # the previous block's own first slice
        text, mask = batch.text[i:i + 1], batch.mask[i:i + 1]
        velocity = block_velocity(model, batch.before[i:i + 1], text, mask, first_slice, Guidance(1.0))
        made = sample(velocity, noise[i:i + 1], 3, "euler")[0]  # the pipeline's way to a block
        assert torch.allclose(rolled[i], made, atol=1e-5) and not torch.allclose(rolled[i], batch.previous[i])


def test_a_run_with_sampled_rollouts_trains_and_its_stage_says_so(tiny, cache, tmp_path):
    run = tiny.flow_run(cache, tmp_path / "sampled", steps=2, rollout_p=0.5, rollout_steps=2)
    assert np.isfinite(train_flow.train(run)["loss"])
    assert [(s["rollout_p"], s["rollout_steps"]) for s in export.lineage(tmp_path / "sampled")] == [(0.5, 2)]


def test_denoiser_loss_falls_on_a_fixed_batch(tiny, cache):
    torch.manual_seed(0)
    config = train_flow.denoiser_config(tiny.flow_run(cache, "unused"), LatentStore(cache))
    model = train_flow.Conditioned(STDiT(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = tiny.draw(cache, 4)
    x0, prev, text, mask, first_slice, t = batch.x0, batch.previous, batch.text, batch.mask, batch.first_slice, batch.t
    noise = noises(batch, torch.device("cpu"), rollout=False).noise
    z_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    losses = []
    for _ in range(10):
        loss = torch.nn.functional.mse_loss(model(z_t, t, prev, text, mask, first_slice), noise - x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_resume_continues_bit_for_bit(tiny, cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_flow.train(tiny.flow_run(cache, straight, steps=4, rollout_p=0.5, workers=2))  # worker processes or not:
    train_flow.train(tiny.flow_run(cache, resumed, steps=2, rollout_p=0.5))  # the same samples
    train_flow.train(tiny.flow_run(cache, resumed, steps=4, resume=True, rollout_p=0.5))
    a, b = load_file(straight / "checkpoint.safetensors"), load_file(resumed / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optimizer/") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "loss.csv").read_text().count("\n") == 5
    losses = [[row.split(",")[2] for row in (f / "loss.csv").read_text().splitlines()] for f in (straight, resumed)]
    assert losses[0] == losses[1]


def test_warm_start_into_a_clean_prediction_run(tiny, cache, tmp_path):
    """--init copies the earlier run's EMA weights; with lr 0 the step leaves them as they were."""
    velocity, clean = tmp_path / "velocity", tmp_path / "clean"
    train_flow.train(tiny.flow_run(cache, velocity, steps=2))
    result = train_flow.train(tiny.flow_run(cache, clean, steps=1, init=velocity, prediction="clean", lr=0.0,
                                            time_shift=3.0))
    a, b = load_file(velocity / "checkpoint.safetensors"), load_file(clean / "checkpoint.safetensors")
    weights = [k.removeprefix("ema/") for k in a if k.startswith("ema/")]
    assert weights and all(torch.equal(b[f"model/{k}"], a[f"ema/{k}"]) for k in weights)
    # the copy is the EMA, not the raw weights
    assert not all(torch.equal(a[f"model/{k}"], a[f"ema/{k}"]) for k in weights)
    assert read_meta(clean / "checkpoint.safetensors")["denoiser"]["prediction"] == "clean"
    assert np.isfinite(result["loss"])


def test_warm_start_adds_switched_on_parts_that_change_nothing_yet(tiny, cache, tmp_path):
    plain, placed = tmp_path / "plain", tmp_path / "placed"
    train_flow.train(tiny.flow_run(cache, plain, steps=2))
    train_flow.train(tiny.flow_run(cache, placed, steps=1, init=plain, slice_position=True, pooled_text=True,
                               seam_context=True, lr=0.0))
    a, b = load_file(plain / "checkpoint.safetensors"), load_file(placed / "checkpoint.safetensors")
    added = [k for k in b if k.startswith(("model/position_embed.", "model/text_vector.", "model/seam_embed."))]
    assert {k.split(".")[0] for k in added} == {"model/position_embed", "model/text_vector", "model/seam_embed"}
    assert not any(k.replace("model/", "ema/", 1) in a for k in added)
    assert all(torch.equal(b[f"model/{k[4:]}"], a[k]) for k in a if k.startswith("ema/"))
    config = read_meta(placed / "checkpoint.safetensors")["denoiser"]
    assert config["slice_position"] is True and config["pooled_text"] is True and config["seam_context"] is True
    with pytest.raises(ctflow.CTFlowError, match="does not fit"):  # other shapes are refused, not half-loaded
        train_flow.train(tiny.flow_run(cache, tmp_path / "other", steps=1, init=placed, hidden=64, heads=2))
    stages = export.lineage(placed)  # the model card counts every stage's training
    assert [(s["run"], s["steps"], s["slice_position"], s["pooled_text"], s["seam_context"], s["caches"])
            for s in stages] == [("plain", 2, False, False, False, ["latents"]),
                                 ("placed", 1, True, True, True, ["latents"])]
    shutil.rmtree(plain)
    assert [s.get("missing", False) for s in export.lineage(placed)] == [True, False]


def test_code_lr_makes_the_code_embedding_alone_learn_faster(tiny, twin_store, tmp_path):
    """--code-lr: the finding code's embedding, added at a warm start, moves further in the same steps; the rest of
    the denoiser learns as before; the card's stage table records the scale."""
    plain = tmp_path / "plain"
    train_flow.train(tiny.flow_run(twin_store, plain, steps=1))
    moved = {}
    for scale in (1.0, 30.0):
        out = tmp_path / f"code_lr_{scale:g}"
        train_flow.train(tiny.flow_run(twin_store, out, steps=3, init=plain, text_drop=0.0, start_p=1.0,
                                       finding_code=True, code_lr=scale))
        moved[scale] = load_file(out / "checkpoint.safetensors")
    grown = [moved[s]["model/finding_embed.weight"].norm() for s in (1.0, 30.0)]
    assert grown[1] > 5 * grown[0] > 0
    run = tiny.flow_run(twin_store, tmp_path / "unused", finding_code=True, code_lr=30.0)
    model = STDiT(train_flow.denoiser_config(run, LatentStore(twin_store)))
    *rest, fast = train_flow.parameter_groups(model, run)
    assert fast["lr_scale"] == 30.0 and [id(p) for p in fast["params"]] == [id(p) for p in
                                                                            model.finding_embed.parameters()]
    assert sum(len(group["params"]) for group in rest) + 2 == len(list(model.parameters()))
    assert [s["code_lr"] for s in export.lineage(tmp_path / "code_lr_30")] == [1.0, 30.0]
    with pytest.raises(ctflow.CTFlowError, match="give --side-code, --side-map, --finding-code or --finding-map"):
        train_flow.train(tiny.flow_run(twin_store, tmp_path / "uncoded", steps=1, code_lr=30.0))


@pytest.mark.parametrize("options, field, embedding, card", [
    ({"side_code": True}, "side_code", "side_embed", "told the side of each sided finding"),
    ({"side_map": True}, "side_map", "side_map_embed", "each patch told the findings its half of the report names"),
    ({"side_map": True, "lobe_map": True}, "lobe_map_slices", "side_map_embed", "read at the levels of its block"),
    ({"finding_code": True}, "finding_code", "finding_embed", "told which findings the report reports"),
    ({"finding_map": True}, "finding_map", "finding_map_embed", "each patch told which findings the report reports")])
def test_a_side_code_run_starts_from_a_model_without_and_exports_a_model_that_reads_it(tiny, twin_store, vae_run,
                                                                                        tmp_path, options, field,
                                                                                        embedding, card):
    """--side-code (--side-map, --lobe-map) adds the side embedding to a warm start as a no-op, trains it on the
    prompts' side codes (half codes, at each block's levels; the stores' cohorts' reports: "... with right
    consolidation."), and the exported model's pipeline passes them."""
    plain, sided = tmp_path / "plain", tmp_path / "sided"
    train_flow.train(tiny.flow_run(twin_store, plain, steps=1))
    train_flow.train(tiny.flow_run(twin_store, sided, steps=4, init=plain, text_drop=0.0, start_p=1.0, **options))
    weights = load_file(sided / "checkpoint.safetensors")
    assert weights[f"model/{embedding}.weight"].abs().sum() > 0  # trained: a sided report was drawn
    assert f"ema/{embedding}.weight" not in load_file(plain / "checkpoint.safetensors")
    assert read_meta(sided / "checkpoint.safetensors")["denoiser"][field]  # the lobe map: the store's median length
    option = list(options)[-1]
    assert [s[option] for s in export.lineage(sided)] == [False, True]
    with pytest.raises(ctflow.CTFlowError, match="does not fit"):  # its side embedding is not dropped silently
        train_flow.train(tiny.flow_run(twin_store, tmp_path / "unsided", steps=1, init=sided))
    if option == "lobe_map":
        with pytest.raises(ctflow.CTFlowError, match="give --side-map too"):
            train_flow.train(tiny.flow_run(twin_store, tmp_path / "unmapped", steps=1, lobe_map=True))
    parser = argparse.ArgumentParser()
    export.configure(parser)
    folder = export.export(export.ExportRun.from_args(parser.parse_args([
        "--flow", str(sided), "--vae", str(vae_run[0]), "--cache", str(twin_store), "--out", str(tmp_path / "model"),
        "--steps", "2", "--calibration-cases", "2", "--guidance", "3"])))  # calibrated with the reports' side codes
    assert card in (folder / "README.md").read_text()  # the card says so
    pipeline = ctflow.CTFlowPipeline.from_pretrained(folder, device="cpu")
    assert getattr(pipeline.config.denoiser, field) and getattr(pipeline.denoiser, embedding) is not None
    report = "Findings: Consolidation in the right lower lobe."
    made = pipeline.generate(ctflow.GenerationRequest(report, slices=4, seed=1, steps=2))
    other = pipeline.generate(ctflow.GenerationRequest(report.replace("right", "left"), slices=4, seed=1, steps=2))
    assert made.hu.shape[0] == 4 and not np.array_equal(made.hu, other.hu)


def test_the_seam_weight_counts_the_blocks_first_slices_that_many_times():
    target = torch.zeros(2, 3, 8, 4, 4)
    off_first, off_last = target.clone(), target.clone()
    off_first[:, :, :2] = 1  # wrong only in the two slices that join the previous block
    off_last[:, :, -2:] = 1
    plain = torch.nn.functional.mse_loss(off_first, target)
    assert train_flow.seam_weighted_mse(off_first, target, 2, 1.0) == plain
    assert train_flow.seam_weighted_mse(off_first, target, 2, 4.0) == 4 * plain
    assert train_flow.seam_weighted_mse(off_last, target, 2, 4.0) == plain


def test_seam_context_trains_on_exact_slices_across_the_seam(tiny, cache, tmp_path, monkeypatch):
    """The previous block gets noise and the model's own estimates, except its last patch of slices: the new block
    must learn to continue those as they are."""
    seen = []
    prepare = STDiT.prepare

    def recording(self, previous, *args):  # a spy: records what the real method gets, then runs it
        if torch.is_grad_enabled():  # the training pass, not the no-grad rollout estimate of the previous block
            seen.append(previous.detach().clone())
        return prepare(self, previous, *args)

    monkeypatch.setattr(STDiT, "prepare", recording)
    train_flow.train(tiny.flow_run(cache, tmp_path / "seam", steps=2, seam_context=True, cond_noise=0.5, rollout_p=1.0,
                               start_p=0.0))
    store = LatentStore(cache)
    windows = [store.latents(v).transpose(0, 1) for v in range(len(store))]  # [C, S, h, w] each

    def is_real(slices):  # [C, n, h, w]: n consecutive slices of some cached volume, bit for bit
        n = slices.shape[1]
        return any(torch.equal(slices, v[:, i : i + n]) for v in windows for i in range(v.shape[1] - n + 1))

    assert len(seen) == 2 and all(is_real(block[:, -2:]) and not is_real(block[:, :2]) for p in seen for block in p)
