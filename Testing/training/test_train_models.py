"""Model training on tiny data: real optimisation steps, exact resume, export into a loadable ctflow model.

A tiny prepared folder (16x16 slices, white end slices, Findings/Impressions reports) is written with the
data package's own writer; the tiny VAE and denoiser presets keep every training to seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ctflow
from ctflow.io import plain_mode
from ctflow.config import DENOISER_PRESETS
from ctflow.denoiser import STDiT
from ctflow.report import Report
from ctflow.volume import Geometry, Volume
from ctflow_train import cli, evaluate, export, finding_study, latent_store, train_flow, train_vae
from ctflow_train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from ctflow_train.dataset import DatasetWriter
from ctflow_train.findings import FINDINGS
from ctflow_train.flow_data import BlockDataset, SamplingRules, ShareSampler, block_loader, collate, noises
from ctflow_train.latent_store import LatentStore, open_stores
from ctflow_train.training_data import list_cases, load_cases

SIZE, BLOCK = 16, 4


def tiny_volume(rng: np.random.Generator, slices: int) -> np.ndarray:
    """int16 [slices + 4 white, 16, 16]: air, a soft-tissue body, two dark lungs whose size changes along z."""
    j, i = np.mgrid[:SIZE, :SIZE]
    hu = np.full((slices + 4, SIZE, SIZE), -1000, np.int16)
    for k in range(slices):
        body = (j - 8) ** 2 / 36 + (i - 8) ** 2 / 49 < 1
        lung_r = 1.5 + 2 * np.sin(np.pi * k / slices) + rng.uniform(-0.3, 0.3)
        lungs = ((j - 8) ** 2 + (i - 5) ** 2 < lung_r**2) | ((j - 8) ** 2 + (i - 11) ** 2 < lung_r**2)
        hu[k][body] = 40
        hu[k][lungs] = -850
    hu[slices:] = 1000
    return hu


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine thread hand-offs cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with DatasetWriter(folder) as writer:
        for n in range(4):
            report = Report(findings=f"Patient {n}. {'Pleural effusion.' if n % 2 else 'No pleural effusion.'}",
                            impressions="Normal." if n % 2 == 0 else "Effusion.")
            writer.add(f"tiny_{n}", Volume(tiny_volume(rng, 14), Geometry((2.0, 2.0, 2.5)), None), report, tiny_labels(n))
    return folder


STUDIED_PARAMETERS = {  # as the cohort's label files give them
    "emphysema": {"severity": "moderate", "low_attenuation_fraction": 0.2},
    "pleural_effusion": {"side": "right", "grade": "small", "depth_mm": 8.8, "volume_ml": 39},
    "consolidation": {"lobe": "right lower lobe", "air_bronchogram": True, "volume_ml": 34, "centre_kji": [6, 8, 5]},
    "cardiomegaly": {"scale": 1.16, "cardiothoracic_ratio": 0.61},
}


def tiny_labels(n: int) -> dict:
    """Every finding absent but the studied ones, which alternate (pleural effusion as the report says); sided
    findings are on the right in patients 0 and 1, on the left in 2 and 3."""
    findings = {finding.name: {"present": False} for finding in FINDINGS}
    for k, name in enumerate(finding_study.STUDIED):
        if (n + k + 1) % 2:
            findings[name] = {"present": True, **on_side(STUDIED_PARAMETERS[name], "right" if n < 2 else "left")}
    return {"name": f"tiny_{n}", "synthetic": True, "findings": findings}


def on_side(params: dict, where: str) -> dict:
    """The parameters with the finding moved to side `where` (its side, or its lobe's)."""
    if "side" in params:
        return {**params, "side": where}
    return {**params, "lobe": params["lobe"].replace("right", where)} if "lobe" in params else params


def vae_args(data, out, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_vae.configure(parser)
    args = parser.parse_args(["--data", str(data), "--out", str(out), "--preset", "tiny", "--size", str(SIZE),
                              "--crop", str(SIZE), "--steps", "6", "--batch", "4", "--adv-start", "3", "--holdout", "1",
                              "--warmup", "1", "--eval-slices", "8", "--eval-every", "1"])
    return argparse.Namespace(**{**vars(args), **overrides})


def flow_args(cache, out, **overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_flow.configure(parser)
    args = parser.parse_args(["--cache", str(cache), "--out", str(out), "--preset", "tiny", "--block", str(BLOCK),
                              "--batch", "3", "--steps", "4", "--warmup", "1", "--lr", "1e-3", "--save-every", "2",
                              "--workers", "0"])
    return argparse.Namespace(**{**vars(args), **overrides})


@pytest.fixture(scope="module")
def vae_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vae")
    return out, train_vae.train(vae_args(data, out))


@pytest.fixture(scope="module")
def cache(data, vae_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "latents"
    latent_store.build_store(data, vae_run[0] / "vae", path, 1, SIZE, ctflow.ModelConfig().text, log=lambda line: None)
    return path


# ------------------------------------------------------------------------------------------ autoencoder


def test_ssim_and_psnr_on_known_cases():
    a = torch.rand(2, 32, 32)
    assert torch.allclose(train_vae.ssim(a, a), torch.ones(2))
    assert (train_vae.ssim(a, 1 - a) < 0).all()  # inverted contrast: negative correlation
    assert train_vae.ssim(a, a + 0.1 * torch.randn_like(a)).mean() < 0.95
    assert torch.allclose(train_vae.psnr(a, a + 0.1, 1.0), torch.full((2,), 20.0), atol=1e-3)


def test_vae_loss_falls_on_a_fixed_batch(data, tmp_path):
    args = vae_args(data, tmp_path, lr=3e-3, adv_start=100)
    autoencoder, disc, opt_vae, opt_disc = train_vae.build(args)
    pool = train_vae.slice_pool(load_cases(data, list_cases(data, 1)[0]))
    hu = train_vae.draw_batch(pool, 4, SIZE, 0.0, torch.Generator().manual_seed(0))
    losses = [train_vae.train_step(autoencoder, disc, opt_vae, opt_disc, hu, step, args)["rec_l1"] for step in range(8)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_vae_run_writes_a_standardised_vae_with_held_out_metrics(vae_run):
    out, metrics = vae_run
    assert (out / "vae" / "config.json").is_file() and (out / "loss.csv").is_file()
    assert metrics["held_out_patients"] == ["tiny_3"]
    held = metrics["held_out"]
    assert held["slices"] == 8 and np.isfinite(held["psnr_db"]) and -1 <= held["ssim"] <= 1
    rows = (out / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and float(rows[-1].split(",")[4]) != 0  # the discriminator joined at step 3
    vae = latent_store.load_vae(out / "vae", SIZE)
    latents = vae.encode(torch.from_numpy(tiny_volume(np.random.default_rng(1), 12)[:12]))
    assert abs(float(latents.mean())) < 0.5 and 0.5 < float(latents.std()) < 2  # shift/scale make them ~N(0, 1)


def test_decoder_run_keeps_the_latents_and_trains_the_decoder(data, vae_run, tmp_path):
    base, base_metrics = vae_run
    metrics = train_vae.train(vae_args(data, tmp_path, decoder_of=base, steps=3, adv_start=0))
    before = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    encoding = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoding and all(torch.equal(before[k], after[k]) for k in encoding)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    hu = torch.from_numpy(tiny_volume(np.random.default_rng(1), 12)[:12])
    old, new = latent_store.load_vae(base / "vae", SIZE), latent_store.load_vae(tmp_path / "vae", SIZE)
    assert torch.equal(old.encode(hu), new.encode(hu))  # the same standardised latents: caches and denoisers stay valid
    assert metrics["preset"] == base_metrics["preset"] and metrics["steps"] == 3
    assert metrics["decoder_of"]["steps"] == 6 and metrics["decoder_of"]["held_out"] == base_metrics["held_out"]
    assert "then its decoder alone 3 steps" in export.autoencoder_training(metrics)


# ------------------------------------------------------------------------------------------ latent store


def test_store_holds_latents_prompts_and_tokens_one_checksummed_file_a_volume(cache):
    store = LatentStore(cache)
    assert len(store) == 3 and store.latents(0).shape == (18, 4, 8, 8)  # 14 real + 4 white slices
    assert torch.allclose(store.latents(0)[-1], store.end, atol=1e-2)  # white slices are the end latent
    assert store.meta["median_content_slices"] == 14 and store.meta["spacing"] == [2.0, 2.0, 2.5]
    assert len(store.text("length", 0)) > len(store.text("plain", 0))  # "Length: 14 slices" adds tokens
    assert store.empty.shape == (2, 384)  # [CLS] [SEP]
    assert torch.equal(store.window(1, 5, 9), store.latents(1)[5:9])
    with safe_open(str(cache / "volumes" / "tiny_0.safetensors"), framework="pt") as handle:
        assert handle.get_slice("latents").get_dtype() == "F16" and store.meta["dtype"] == "float16"
    header = json.loads((cache / "store.json").read_text())
    assert header["vae"].endswith("vae") and len(header["vae_sha256"]) == 64 and header["text"]["mode"] == "tokens"
    assert latent_store.verify(cache) == []


def test_verify_finds_a_volume_changed_on_disk(cache, tmp_path, capsys):
    copy = shutil.copytree(cache, tmp_path / "copy")
    tensors = load_file(copy / "volumes" / "tiny_1.safetensors")
    tensors["latents"][0, 0, 0, 0] += 1
    save_file(tensors, copy / "volumes" / "tiny_1.safetensors")
    (copy / "volumes" / "tiny_2.safetensors").unlink()
    assert latent_store.verify(copy) == ["tiny_1", "tiny_2"]
    assert cli.main(["verify-latents", str(copy)]) == 1
    assert "2 volume(s)" in capsys.readouterr().err and cli.main(["verify-latents", str(cache)]) == 0


def store_of_another_vae(cache, folder, shift=1.0):
    """A copy of the store whose start latent differs by `shift`: 1 as another VAE would encode the start slice,
    1e-3 as the same VAE run with other thread counts does."""
    other = shutil.copytree(cache, folder / f"other_{shift}")
    common = load_file(other / "common.safetensors")
    common["start"] = common["start"] + shift
    save_file(common, other / "common.safetensors")
    return other


def test_stores_of_one_encoder_train_as_one_and_others_are_refused(cache, tmp_path):
    dataset = BlockDataset(open_stores([cache, cache]), SamplingRules(BLOCK), 0)
    assert len(dataset) == 6 and sorted(dataset.volume(p)[1] for p in range(6)) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ctflow.CTFlowError, match="another VAE"):
        open_stores([cache, store_of_another_vae(cache, tmp_path)])
    assert len(open_stores([cache, store_of_another_vae(cache, tmp_path, 1e-3)])) == 2
    with pytest.raises(ctflow.CTFlowError, match="single-file latent cache"):
        LatentStore(save_checkpoint(tmp_path / "old.safetensors", {}, {}, {}, {}))


def test_encoding_shares_out_over_ranks_resumes_and_adds(data, vae_run, cache, tmp_path, monkeypatch, capsys):
    """Two ranks (as torchrun sets them) each encode their share; the last to finish merges the index. A rerun
    encodes only what is missing, and a rerun over more cases adds them."""
    out, vae, text = tmp_path / "store", vae_run[0] / "vae", ctflow.ModelConfig().text

    def build(rank, world, holdout=1, **options):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        return latent_store.build_store(data, vae, out, holdout, SIZE, text, log=lambda line: None, **options)

    assert build(0, 2)["encoded"] == 2 and not (out / "index.jsonl").exists()  # tiny_0, tiny_2; tiny_1 is rank 1's
    with pytest.raises(ctflow.CTFlowError, match="stopped before the end"):
        LatentStore(out)
    assert build(1, 2)["encoded"] == 1 and build(1, 2)["encoded"] == 0  # the second time: nothing left to do
    single, shared = LatentStore(cache), LatentStore(out)
    assert shared.names == single.names == ["tiny_0", "tiny_1", "tiny_2"]
    assert all(torch.allclose(shared.latents(v), single.latents(v), atol=1e-2) for v in range(3))
    (out / "rows" / "tiny_1.json").unlink()  # stopped between its volume and its row: made again
    before = (out / "volumes" / "tiny_0.safetensors").stat().st_mtime_ns
    summary = build(0, 1, holdout=0)  # and tiny_3, held out until now, is added
    assert summary["encoded"] == 2 and summary["volumes"] == 4 and LatentStore(out).names[-1] == "tiny_3"
    assert (out / "volumes" / "tiny_0.safetensors").stat().st_mtime_ns == before  # finished volumes stay as they are
    with pytest.raises(ctflow.CTFlowError, match="dtype float16, not bfloat16"):
        build(0, 1, dtype="bfloat16")
    store_of_another_vae(out, tmp_path).rename(tmp_path / "another")
    command = ["cache-latents", "--data", str(data), "--vae", str(vae), "--out", str(tmp_path / "another"), "--size",
               str(SIZE), "--holdout", "1"]
    assert cli.main(command) == 1 and "another VAE or text encoder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ sampling


def draw(cache, n, seed=0, first=0, **rules) -> "train_flow.Batch":
    """Samples first..first+n-1 of a run over the store, as one batch."""
    dataset = BlockDataset(open_stores([cache]), SamplingRules(BLOCK, **rules), seed)
    return collate([dataset[p] for p in range(first, first + n)])


def test_batches_follow_startboost_and_text_dropout(cache):
    store = LatentStore(cache)
    batch = draw(cache, 5, start_p=1.0, text_drop=1.0)
    assert batch.x0.shape == batch.previous.shape == batch.before.shape == (5, 4, BLOCK, 8, 8)
    assert batch.first.all()
    assert torch.equal(batch.previous, store.start[None, :, None].expand_as(batch.previous))  # black previous
    assert torch.equal(batch.text[:, :2], store.empty[None].expand(5, -1, -1)) and batch.mask.sum(1).eq(2).all()
    batch = draw(cache, 50, start_p=0.0, text_drop=0.0)
    assert not batch.first.any()
    assert not torch.equal(batch.previous[0], store.start[:, None].expand_as(batch.previous[0]))
    lengths = set(batch.mask.sum(1).tolist())
    assert len(lengths) >= 2  # plain and length prompts both drawn
    assert 0 <= batch.t.min() and batch.t.max() <= 1 and draw(cache, 50, time_shift=3.0).t.mean() > batch.t.mean()


def test_batch_windows_are_consecutive_blocks_of_one_volume(cache):
    store = LatentStore(cache)
    batch = draw(cache, 20, seed=1, start_p=0.0)
    padded = [torch.cat([store.start[None].expand(2 * BLOCK, -1, -1, -1), store.latents(v)]) for v in range(3)]
    for i in range(20):
        window = torch.cat([batch.before[i], batch.previous[i], batch.x0[i]], dim=1).permute(1, 0, 2, 3)  # [3T, C, h, w]
        assert any(torch.equal(window, v[o : o + 3 * BLOCK]) for v in padded for o in range(BLOCK, len(v) - 3 * BLOCK + 1))


def test_every_epoch_visits_each_volume_once_and_ranks_take_disjoint_shares(cache):
    stores = open_stores([cache, cache])
    dataset = BlockDataset(stores, SamplingRules(BLOCK), 0)
    numbers = [[3 * stores.index(store) + v for store, v in map(dataset.volume, range(e * 6, e * 6 + 6))]
               for e in range(3)]
    assert all(sorted(epoch) == list(range(6)) for epoch in numbers)
    assert len({tuple(epoch) for epoch in numbers}) > 1  # a new order each epoch
    ranks = [ShareSampler(rank, 2, 3, start=12) for rank in range(2)]
    taken = [list(itertools.islice(iter(sampler), 9)) for sampler in ranks]  # 3 steps of a global batch of 6
    assert not set(taken[0]) & set(taken[1]) and sorted(taken[0] + taken[1]) == list(range(12, 30))
    assert taken[0][:3] == [12, 13, 14] and taken[1][:3] == [15, 16, 17]


def test_a_sample_depends_on_its_position_only_not_on_the_worker_that_makes_it(cache):
    dataset = BlockDataset(open_stores([cache]), SamplingRules(BLOCK), 0)
    alone = collate([dataset[p] for p in range(12, 18)])
    loader = block_loader(dataset, ShareSampler(0, 1, 3, start=12), workers=2, pin_memory=False)
    batches = iter(loader)
    workers = [next(batches), next(batches)]
    for name, value in alone._asdict().items():
        assert torch.equal(value[:3], getattr(workers[0], name)[: len(value[:3])]) or name in ("text", "mask")
        assert torch.equal(value[3:], getattr(workers[1], name)[: len(value[3:])]) or name in ("text", "mask")
    assert not torch.equal(alone.seed, draw(cache, 6, first=13).seed)
    noise = noises(alone, torch.device("cpu"), rollout=True)  # made from each sample's seed, whatever the batch
    assert torch.equal(noise.cond[4:], noises(draw(cache, 2, first=16), torch.device("cpu"), rollout=True).cond)
    assert noise.noise.shape == alone.x0.shape and noises(alone, torch.device("cpu"), rollout=False).rollout is None
    assert abs(float(noise.noise.std()) - 1) < 0.1 and not torch.equal(noise.noise, noise.cond)


def test_rollout_replaces_only_previous_blocks_that_follow_real_slices(cache):
    torch.manual_seed(0)
    model = STDiT(train_flow.denoiser_config(flow_args(cache, "unused"), LatentStore(cache))).eval()
    batch = draw(cache, 8, seed=2)
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


# ------------------------------------------------------------------------------------------ flow training


def test_denoiser_loss_falls_on_a_fixed_batch(cache):
    torch.manual_seed(0)
    config = train_flow.denoiser_config(flow_args(cache, "unused"), LatentStore(cache))
    model = train_flow.Conditioned(STDiT(config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = draw(cache, 4)
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


def test_resume_continues_bit_for_bit(cache, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_flow.train(flow_args(cache, straight, steps=4, rollout_p=0.5, workers=2))  # worker processes or not:
    train_flow.train(flow_args(cache, resumed, steps=2, rollout_p=0.5))  # the same samples
    train_flow.train(flow_args(cache, resumed, steps=4, resume=True, rollout_p=0.5))
    a, b = load_file(straight / "checkpoint.safetensors"), load_file(resumed / "checkpoint.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optimizer/") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "loss.csv").read_text().count("\n") == 5
    losses = [[row.split(",")[2] for row in (f / "loss.csv").read_text().splitlines()] for f in (straight, resumed)]
    assert losses[0] == losses[1]


def test_warm_start_into_a_clean_prediction_run(cache, tmp_path):
    """--init copies the earlier run's EMA weights; with lr 0 the step leaves them as they were."""
    velocity, clean = tmp_path / "velocity", tmp_path / "clean"
    train_flow.train(flow_args(cache, velocity, steps=2))
    result = train_flow.train(flow_args(cache, clean, steps=1, init=velocity, prediction="clean", lr=0.0, time_shift=3.0))
    a, b = load_file(velocity / "checkpoint.safetensors"), load_file(clean / "checkpoint.safetensors")
    weights = [k.removeprefix("ema/") for k in a if k.startswith("ema/")]
    assert weights and all(torch.equal(b[f"model/{k}"], a[f"ema/{k}"]) for k in weights)
    assert not all(torch.equal(a[f"model/{k}"], a[f"ema/{k}"]) for k in weights)  # the copy is the EMA, not the raw weights
    assert read_meta(clean / "checkpoint.safetensors")["denoiser"]["prediction"] == "clean"
    assert np.isfinite(result["loss"])


def test_warm_start_adds_switched_on_parts_that_change_nothing_yet(cache, tmp_path):
    plain, placed = tmp_path / "plain", tmp_path / "placed"
    train_flow.train(flow_args(cache, plain, steps=2))
    train_flow.train(flow_args(cache, placed, steps=1, init=plain, slice_position=True, pooled_text=True,
                               seam_context=True, lr=0.0))
    a, b = load_file(plain / "checkpoint.safetensors"), load_file(placed / "checkpoint.safetensors")
    added = [k for k in b if k.startswith(("model/position_embed.", "model/text_vector.", "model/seam_embed."))]
    assert {k.split(".")[0] for k in added} == {"model/position_embed", "model/text_vector", "model/seam_embed"}
    assert not any(k.replace("model/", "ema/", 1) in a for k in added)
    assert all(torch.equal(b[f"model/{k[4:]}"], a[k]) for k in a if k.startswith("ema/"))
    config = read_meta(placed / "checkpoint.safetensors")["denoiser"]
    assert config["slice_position"] is True and config["pooled_text"] is True and config["seam_context"] is True
    with pytest.raises(ctflow.CTFlowError, match="does not fit"):  # other shapes are refused, not half-loaded
        train_flow.train(flow_args(cache, tmp_path / "other", steps=1, init=placed, hidden=64, heads=2))
    stages = export.lineage(placed)  # the model card counts every stage's training
    assert [(s["run"], s["steps"], s["slice_position"], s["pooled_text"], s["seam_context"], s["caches"])
            for s in stages] == [("plain", 2, False, False, False, ["latents"]),
                                 ("placed", 1, True, True, True, ["latents"])]
    shutil.rmtree(plain)
    assert [s.get("missing", False) for s in export.lineage(placed)] == [True, False]


def test_seam_context_trains_on_exact_slices_across_the_seam(cache, tmp_path, monkeypatch):
    """The previous block gets noise and the model's own estimates, except its last patch of slices: the new block
    must learn to continue those as they are."""
    seen = []
    prepare = STDiT.prepare

    def recording(self, previous, *args):  # a spy: records what the real method gets, then runs it
        if torch.is_grad_enabled():  # the training pass, not the no-grad rollout estimate of the previous block
            seen.append(previous.detach().clone())
        return prepare(self, previous, *args)

    monkeypatch.setattr(STDiT, "prepare", recording)
    train_flow.train(flow_args(cache, tmp_path / "seam", steps=2, seam_context=True, cond_noise=0.5, rollout_p=1.0,
                               start_p=0.0))
    store = LatentStore(cache)
    windows = [store.latents(v).transpose(0, 1) for v in range(len(store))]  # [C, S, h, w] each

    def is_real(slices):  # [C, n, h, w]: n consecutive slices of some cached volume, bit for bit
        n = slices.shape[1]
        return any(torch.equal(slices, v[:, i : i + n]) for v in windows for i in range(v.shape[1] - n + 1))

    assert len(seen) == 2 and all(is_real(block[:, -2:]) and not is_real(block[:, :2]) for p in seen for block in p)


def test_batches_say_where_each_block_starts(cache):
    store = LatentStore(cache)
    batch = draw(cache, 30, seed=3, start_p=0.3)
    for i in range(30):
        offset = int(batch.first_slice[i])
        assert bool(batch.first[i]) == (offset == 0)
        assert any(len(v) >= offset + BLOCK and torch.equal(batch.x0[i].transpose(0, 1), v[offset : offset + BLOCK])
                   for v in map(store.latents, range(len(store))))


def test_checkpoint_refuses_missing_random_state(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"m": torch.nn.Linear(2, 2)}, {}, {}, {"step": 1})
    assert path.stat().st_mode & 0o777 == plain_mode()  # not left private, as the temporary file was
    with pytest.raises(ctflow.CTFlowError, match="random state"):
        load_checkpoint(path, {}, {}, {"data": torch.Generator()})


# ------------------------------------------------------------------------------------------ export


def test_end_tolerance_separates_white_from_real_frames():
    end = export.choose_tolerance({"white": [0.05, 0.08, 0.3], "content": [0.9, 1.2, 0.25]})
    assert end["reliable"] is False and end["tolerance"] == pytest.approx(0.125)  # one real frame in the white range
    end = export.choose_tolerance({"white": [0.1, 0.2], "content": [0.5, 0.7]})
    assert end == {"tolerance": pytest.approx(0.35), "accuracy": 1.0, "reliable": True}


def test_export_loads_in_ctflow_and_generates(data, vae_run, cache, tmp_path):
    flow = tmp_path / "flow"
    train_flow.train(flow_args(cache, flow, steps=3))
    figures = tmp_path / "figures.json"  # as evaluate and finding-study write them: figures plus long details
    figures.write_text(json.dumps({"seconds_per_128_slices": 12.5, "seams": {"ratio": 1.1, "volumes": [{"x": 1}]},
                                   "values": {"normal": [0.25]}, "reports": {"normal": "Findings: ABSENT-TEXT."},
                                   "detectors": {"emphysema": {"cross_validated_accuracy": 0.62, "volumes": 236,
                                                               "patients": 76},
                                                 "consolidation": {"side": {"cross_validated_accuracy": 0.71,
                                                                           "always_the_commoner_side": 0.54}}},
                                   "seeds": 10, "steps": 16, "guidance": 1.0, "shown_when_asked": {"emphysema": 7},
                                   "shown_when_negated": {"emphysema": 3}, "asking_raised_probability": {"emphysema": 8},
                                   "own_report_ranked_first": {"emphysema": 4},
                                   "at_reported_side": {"consolidation": {"right": 6, "left": 2}},
                                   "right_report_more_right": {"consolidation": 9},
                                   "side_values": {"consolidation": {"right": [0.875]}}}))
    parser = argparse.ArgumentParser()
    export.configure(parser)
    args = parser.parse_args(["--flow", str(flow), "--vae", str(vae_run[0]), "--cache", str(cache),
                              "--out", str(tmp_path / "model"), "--steps", "2", "--calibration-cases", "2", "--half",
                              "--evaluation", str(figures)])
    folder = export.export(args)
    stored = load_file(folder / "model.safetensors")
    ema = {k.removeprefix("ema/"): v for k, v in load_file(flow / "checkpoint.safetensors").items() if k.startswith("ema/")}
    assert stored.keys() == ema.keys() and all(v.dtype == torch.float16 for v in stored.values())
    assert all(torch.equal(stored[k], ema[k].half()) for k in ema)  # the EMA weights, rounded to half
    config = json.loads((folder / "config.json").read_text())
    tiny = DENOISER_PRESETS["tiny"]
    assert config["denoiser"]["hidden_size"] == tiny.hidden_size and config["denoiser"]["latent_size"] == 8
    assert config["typical_slices"] == 14 and config["geometry"]["spacing"] == [2.0, 2.0, 2.5]
    assert config["end_tolerance"] > 0 and config["max_slices"] in (256, 14)  # 14: could not calibrate the end
    card = (folder / "README.md").read_text()
    assert "not for clinical use" in card and "PSNR" in card and "ONE real base anatomy" in card
    assert "Trained in 1 stage(s)" in card and "| flow | 3 |" in card and "| False | False | latents |" in card
    assert "slice position" in card and "pooled-text vector" not in card  # the card names only what the model has
    assert '- seconds_per_128_slices: 12.5' in card and '- seams: {"ratio": 1.1}' in card
    assert "ABSENT-TEXT" not in card and "0.25" not in card  # per-volume details stay in the JSON
    assert "| emphysema | 0.62 | 7/10 | 3/10 | 8/10 | 4/10 |" in card and "- shown_when_asked" not in card
    assert "labels of 236 cached volumes of 76 training patients" in card
    assert "| consolidation | 0.71 (0.54) | 6/10 | 2/10 | 9/10 |" in card and "- at_reported_side" not in card
    assert "0.875" not in card
    pipe = ctflow.CTFlowPipeline.from_pretrained(folder, device="cpu")
    volume = pipe.generate(ctflow.GenerationRequest("Findings: No pleural effusion.", slices=6, seed=1))
    assert volume.hu.shape == (6, SIZE, SIZE) and volume.hu.dtype == np.int16
    assert volume.provenance.prompt.endswith("Length: 6 slices\nSpacing: 2.5 mm")


# ------------------------------------------------------------------------------------------ evaluation


def test_seam_jump_separates_block_boundaries_from_block_insides():
    hu = np.zeros((20, 4, 4), np.int16)
    hu[8:] += 100  # a 100 HU step between slices 7 and 8: a block boundary for blocks of 4
    hu[16:] = 1000  # white end slices: not part of the volume
    assert evaluate.real_slices(hu) == 16
    assert evaluate.seam_jump(hu, 4) == {"boundary_hu": pytest.approx(100 / 3), "inside_hu": 0.0}


def test_grid_features_are_the_mean_and_spread_of_each_cell():
    latents = torch.zeros(16, 4, 8, 8)
    latents[:8, 2] = 1.0  # channel 2 bright in the upper half of the body
    latents[:, 1, :, 0] = 3.0  # channel 1: a bright column in every slice, spread within the cells that hold it
    mean, spread = finding_study.grid_features(latents).reshape(2, 4, *finding_study.GRID)
    assert np.all(mean[2, :4] == 1.0) and np.all(mean[2, 4:] == 0.0) and np.all(spread[2] == 0.0)
    assert np.all(spread[1, :, 0] == 0.0) and mean[1].sum() == 3.0 * 8 * 8


def test_probe_learns_a_finding_and_cross_validation_keeps_twins_apart():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 200)), rng.random(80) < 0.5
    x[np.ix_(y, np.arange(20))] += 0.8  # the finding shifts a region's averages a little
    groups = [f"p{i // 2}" for i in range(80)]
    assert finding_study.cross_validated_accuracy(x, y, groups) > 0.8
    probe = finding_study.fit_probe(x, y)
    assert ((probe.probability(x) > 0.5) == y).mean() > 0.9
    # a patient and his twin are near copies with one label: only a split that keeps them together is honest
    noise, labels = rng.normal(size=(40, 200)), rng.random(40) < 0.5
    twins = np.repeat(noise, 2, axis=0) + 0.05 * rng.normal(size=(80, 200))
    together = finding_study.cross_validated_accuracy(twins, np.repeat(labels, 2), groups)
    apart = finding_study.cross_validated_accuracy(twins, np.repeat(labels, 2), [str(i) for i in range(80)])
    assert together < 0.75 and apart > 0.9


def test_mirrored_difference_is_the_features_minus_those_of_the_mirrored_volume():
    latents = torch.from_numpy(np.random.default_rng(0).normal(size=(16, 4, 16, 16))).float()
    features = finding_study.grid_features(latents)
    expected = features - finding_study.grid_features(latents.flip(-1))
    assert np.allclose(finding_study.mirrored_difference(features), expected, atol=1e-6)
    assert np.allclose(finding_study.mirrored_difference(np.stack([features, features]))[1], expected, atol=1e-6)
    symmetric = torch.cat([latents[..., :8], latents[..., :8].flip(-1)], -1)
    assert np.abs(finding_study.mirrored_difference(finding_study.grid_features(symmetric))).max() < 1e-6


def test_a_finding_is_on_one_side_by_its_side_or_its_lobe():
    assert finding_study.side({"present": True, "side": "left", "grade": "small"}) == "left"
    assert finding_study.side({"present": True, "side": "bilateral"}) is None
    assert finding_study.side({"present": True, "lobe": "right middle lobe"}) == "right"
    assert finding_study.side({"present": False, "side": "left"}) is None
    assert finding_study.side({"present": True, "scale": 1.2}) is None


def test_finding_study_probes_the_cohort_and_counts_generated_volumes(data, vae_run, cache, tmp_path):
    flow = tmp_path / "flow"
    train_flow.train(flow_args(cache, flow, steps=2))
    parser = argparse.ArgumentParser()
    export.configure(parser)
    export.export(parser.parse_args(["--flow", str(flow), "--vae", str(vae_run[0]), "--cache", str(cache),
                                     "--out", str(tmp_path / "model"), "--steps", "2", "--calibration-cases", "2"]))
    parser = argparse.ArgumentParser()
    finding_study.configure(parser)
    args = parser.parse_args(["--model", str(tmp_path / "model"), "--data", str(data), str(data), "--latents", str(cache),
                              str(cache), "--seeds", "2", "--steps", "2", "--out", str(tmp_path / "findings.json")])
    assert finding_study.run(args) == 0
    result = json.loads((tmp_path / "findings.json").read_text())
    studied = set(finding_study.STUDIED)
    assert all(d["volumes"] == 6 and d["patients"] == 3 and d["with_finding"] in (2, 4) for d in result["detectors"].values())
    for key in ("shown_when_asked", "shown_when_negated", "asking_raised_probability", "own_report_ranked_first"):
        assert set(result[key]) == studied and all(0 <= n <= 2 for n in result[key].values())
    values = result["values"]
    for finding in studied:  # recount two of them from the stored probabilities
        asked, negated = values[finding], values["normal"]
        assert result["asking_raised_probability"][finding] == sum(a[finding] > n[finding] for a, n in zip(asked, negated))
        firsts = sum(max(values, key=lambda kind: values[kind][s][finding]) == finding for s in range(2))
        assert result["own_report_ranked_first"][finding] == firsts
    assert set(result["values"]) == studied | {"normal"} and len(result["values"]["normal"]) == 2
    # sides: the cache holds patients 0-2, so pleural effusion (patients 1, 3) is seen on the right only
    assert result["detectors"]["pleural_effusion"]["side"] == {"skipped": "the cached volumes show it on one side only"}
    side = result["detectors"]["consolidation"]["side"]
    assert side["right"] == 2 and side["left"] == 2 and side["always_the_commoner_side"] == 0.5
    sided = result["sided_reports"]
    assert set(sided) == set(result["at_reported_side"]) == set(result["side_values"]) == {"consolidation"}
    assert "right lower lobe" in sided["consolidation"]["right"] and "left lower lobe" in sided["consolidation"]["left"]
    assert result["reports"]["consolidation"] == sided["consolidation"]["right"]  # its first patient has it on the right
    right = result["side_values"]["consolidation"]
    assert result["at_reported_side"]["consolidation"] == {"right": sum(p > 0.5 for p in right["right"]),
                                                           "left": sum(p < 0.5 for p in right["left"])}
    assert result["right_report_more_right"]["consolidation"] == sum(a > b for a, b in zip(right["right"], right["left"]))
    assert all(0 <= p <= 1 for ps in result["values"].values() for v in ps for p in v.values())
    assert "No emphysema" in result["reports"]["normal"] or "emphysema" in result["reports"]["normal"].lower()
    assert "pleural effusion" in result["reports"]["pleural_effusion"].lower()
    args.latents = args.latents[:1]
    with pytest.raises(ValueError, match="one --latents cache per --data folder"):
        finding_study.run_study(args)
    args.data, args.latents = [data], [store_of_another_vae(cache, tmp_path)]
    with pytest.raises(ValueError, match="not encoded by the model's autoencoder"):
        finding_study.run_study(args)
