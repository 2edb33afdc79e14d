"""The slice autoencoder's training: image metrics, a falling loss, a standardised VAE with held-out figures, a
decoder-only run that keeps the latents, and an anchored run that keeps them outside the findings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ctflow.errors import CTFlowError
from ctflow_train import train_vae
from ctflow_train.runtime import load_vae
from ctflow_train.training_data import list_cases, load_cases

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest



def test_holdout_keeps_every_volume_of_a_held_out_patient_out_of_training(tmp_path):
    """A cohort lists a patient's twins after it, CT-RATE a patient's scans and reconstructions side by side: the
    last N patients go out whole, or the "unseen" patients would have been seen."""
    names = ["synth_0_00000", "synth_0_00001", "synth_0_00001_with_left_pleural_effusion",
             "train_7_a_1", "train_8_a_1", "train_8_a_2", "train_8_b_1"]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps({"name": name}) + "\n" for name in names))
    train, held = list_cases(tmp_path, 1)
    assert [e["name"] for e in held] == ["train_8_a_1", "train_8_a_2", "train_8_b_1"]
    train, held = list_cases(tmp_path, 3)
    assert [e["name"] for e in train] == ["synth_0_00000"] and len(held) == 6
    with pytest.raises(CTFlowError, match="holdout 4 must leave at least one of the 4 patients"):
        list_cases(tmp_path, 4)

def test_ssim_and_psnr_on_known_cases():
    a = torch.rand(2, 32, 32)
    assert torch.allclose(train_vae.ssim(a, a), torch.ones(2))
    assert (train_vae.ssim(a, 1 - a) < 0).all()  # inverted contrast: negative correlation
    assert train_vae.ssim(a, a + 0.1 * torch.randn_like(a)).mean() < 0.95
    assert torch.allclose(train_vae.psnr(a, a + 0.1, 1.0), torch.full((2,), 20.0), atol=1e-3)


def test_vae_loss_falls_on_a_fixed_batch(tiny, data, tmp_path):
    args = tiny.vae_run(data, tmp_path, lr=3e-3, adv_start=100)
    autoencoder, disc, opt_vae, opt_disc = train_vae.build(args)
    pool = train_vae.slice_pool(load_cases(data, list_cases(data, 1)[0]))
    hu, findings = train_vae.draw_batch(pool, 4, tiny.SIZE, 0.0, torch.Generator().manual_seed(0))
    losses = [train_vae.train_step(autoencoder, disc, opt_vae, opt_disc, hu, findings, step, args)["rec_l1"]
              for step in range(8)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_finding_crops_hold_a_finding_and_their_masks_follow_the_crop(data):
    pool = train_vae.slice_pool(load_cases(data, list_cases(data, 1)[0], masks=True))
    assert pool.findings.shape == pool.hu.shape and len(pool.holding) == 6  # tiny_1's slices 4-9
    generator = torch.Generator().manual_seed(0)
    hu, findings = train_vae.draw_batch(pool, 64, 6, 0.0, generator, finding_crop_p=1.0)
    assert findings.flatten(1).any(1).all()  # every 6-pixel crop of a 16-pixel slice holds fluid
    assert (hu[findings] == 10).all() and (hu[~findings] != 10).all()  # the mask marks exactly the drawn fluid
    hu, findings = train_vae.draw_batch(pool, 64, 6, 0.0, generator)
    assert findings.flatten(1).any(1).float().mean() < 0.3  # at random, few crops do
    hu, findings = train_vae.draw_batch(pool, 64, 6, 1.0, generator, finding_crop_p=1.0)
    assert not findings.any()  # a constant start/end slice holds none
    plain = train_vae.slice_pool(load_cases(data, list_cases(data, 1)[0]))
    assert plain.findings is None and not train_vae.draw_batch(plain, 8, 6, 0.0, generator, 1.0)[1].any()


def test_the_finding_weight_spends_the_autoencoder_on_the_findings(tiny, data, tmp_path):
    """The same steps from the same start on the same crops: the weighted run reconstructs the fluid better."""
    pool = train_vae.slice_pool(load_cases(data, list_cases(data, 1)[0], masks=True))
    hu, findings = train_vae.draw_batch(pool, 8, tiny.SIZE, 0.0, torch.Generator().manual_seed(0), finding_crop_p=0.5)
    errors = {}
    for finding_weight in (0.0, 30.0):
        args = tiny.vae_run(data, tmp_path, lr=3e-3, adv_start=100, finding_weight=finding_weight)
        autoencoder, disc, opt_vae, opt_disc = train_vae.build(args)  # seeded: the same start
        torch.manual_seed(1)  # the same posterior samples
        for step in range(25):
            train_vae.train_step(autoencoder, disc, opt_vae, opt_disc, hu, findings, step, args)
        with torch.no_grad():
            recon = autoencoder.decode(autoencoder.encode(hu))
        errors[finding_weight] = float((recon - hu).abs()[findings].mean())
    assert errors[30.0] < 0.8 * errors[0.0], errors


def test_vae_run_writes_a_standardised_vae_with_held_out_metrics(tiny, vae_run):
    out, metrics = vae_run
    assert (out / "vae" / "config.json").is_file() and (out / "loss.csv").is_file()
    assert metrics.held_out_patients == ["tiny_3"]
    held = metrics.held_out
    assert held.slices == 8 and np.isfinite(held.psnr_db) and -1 <= held.ssim <= 1
    assert list(metrics.held_out_findings) == ["pleural_effusion"]  # tiny_3's fluid, measured apart
    assert np.isfinite(metrics.held_out_findings["pleural_effusion"])
    assert "Inside the findings: pleural effusion" in metrics.markdown()
    assert train_vae.AutoencoderMetrics.read(out) == metrics  # metrics.json reads back as written
    assert "decoder_of" not in json.loads((out / "metrics.json").read_text())  # a whole autoencoder was trained
    rows = (out / "loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and float(rows[-1].split(",")[rows[0].split(",").index("gen")]) != 0  # joined at step 3
    vae = load_vae(out / "vae", tiny.SIZE)
    latents = vae.encode(torch.from_numpy(tiny.volume(np.random.default_rng(1), 12)[:12]))
    assert abs(float(latents.mean())) < 0.5 and 0.5 < float(latents.std()) < 2  # shift/scale make them ~N(0, 1)


def test_decoder_run_keeps_the_latents_and_trains_the_decoder(tiny, data, vae_run, tmp_path):
    base, base_metrics = vae_run
    metrics = train_vae.train(tiny.vae_run(data, tmp_path, decoder_of=base, steps=3, adv_start=0))
    before = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    encoding = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert encoding and all(torch.equal(before[k], after[k]) for k in encoding)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    hu = torch.from_numpy(tiny.volume(np.random.default_rng(1), 12)[:12])
    old, new = load_vae(base / "vae", tiny.SIZE), load_vae(tmp_path / "vae", tiny.SIZE)
    assert torch.equal(old.encode(hu), new.encode(hu))  # the same standardised latents: caches and denoisers stay valid
    assert metrics.preset == base_metrics.preset and metrics.steps == 3
    assert metrics.decoder_of.steps == 6 and metrics.decoder_of.held_out == base_metrics.held_out
    assert "then its decoder alone 3 steps" in metrics.training()
    assert train_vae.AutoencoderMetrics.read(tmp_path) == metrics


def test_an_anchored_run_keeps_the_latents_of_slices_without_findings(tiny, data, vae_run, tmp_path):
    """The same finding-weighted steps from the base run, free and anchored: the anchored encoder still encodes the
    slices that hold no finding as the base did, which a denoiser of the base's stores needs."""
    base, _ = vae_run
    pool = train_vae.slice_pool(load_cases(data, list_cases(data, 1)[0], masks=True))
    hu, findings = train_vae.draw_batch(pool, 8, tiny.SIZE, 0.0, torch.Generator().manual_seed(0), finding_crop_p=0.5)
    clear = pool.hu[~pool.findings.flatten(1).any(1)]  # [N, H, W]: slices no finding reaches
    before = load_vae(base / "vae", tiny.SIZE).encode(clear)
    drift = {}
    for weight in (0.0, 10.0):
        args = tiny.vae_run(data, tmp_path, lr=3e-3, adv_start=100, finding_weight=30.0, anchor_to=base,
                            anchor_weight=weight)
        autoencoder, disc, opt_vae, opt_disc = train_vae.build(args)
        anchor = train_vae.frozen_copy(autoencoder)
        torch.manual_seed(1)
        for step in range(25):
            train_vae.train_step(autoencoder, disc, opt_vae, opt_disc, hu, findings, step, args, anchor)
        with torch.no_grad():
            drift[weight] = float((autoencoder.encode(clear) - before).pow(2).mean())
    assert drift[10.0] < 0.3 * drift[0.0], drift


def test_an_anchored_run_continues_the_base_and_says_so(tiny, data, vae_run, tmp_path):
    base, base_metrics = vae_run
    metrics = train_vae.train(tiny.vae_run(data, tmp_path, anchor_to=base, finding_weight=10.0, adv_start=0))
    before = load_file(base / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))  # all of it trains
    assert (metrics.shift_factor, metrics.scaling_factor) == (base_metrics.shift_factor, base_metrics.scaling_factor)
    assert metrics.decoder_of is None and metrics.anchored_to.held_out == base_metrics.held_out
    assert "then all of it with its latents held outside the findings, 6 steps" in metrics.training()
    assert train_vae.AutoencoderMetrics.read(tmp_path) == metrics
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    drift = [float(row.split(",")[rows[0].split(",").index("drift")]) for row in rows[1:]]
    assert drift[0] == 0 and drift[-1] > 0  # the first step starts at the anchor, later ones move off it


def test_resume_continues_bit_for_bit(tiny, data, tmp_path):
    """The data draws and torch's own generator (the posterior's samples) are both in the checkpoint."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_vae.train(tiny.vae_run(data, straight, steps=4, adv_start=1, save_every=2))
    train_vae.train(tiny.vae_run(data, resumed, steps=2, adv_start=1, save_every=2))
    torch.manual_seed(12345)  # whatever ran in between
    train_vae.train(tiny.vae_run(data, resumed, steps=4, adv_start=1, save_every=2, resume=True))
    a, b = load_file(straight / "checkpoint.safetensors"), load_file(resumed / "checkpoint.safetensors")
    assert a.keys() == b.keys() and "rng/torch" in a and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[row.rsplit(",", 1)[0] for row in (f / "loss.csv").read_text().splitlines()] for f in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 5  # all but the last column, the seconds a step took


def test_a_vae_folder_that_is_not_there_is_one_line_not_a_hub_lookup(tmp_path):
    """`export --vae`, `cache-latents` and a VAE run's --init read a VAE folder through the library's one loader."""
    with pytest.raises(CTFlowError, match=f"from {tmp_path / 'none'}: it holds no config.json$"):
        load_vae(tmp_path / "none", 16)
