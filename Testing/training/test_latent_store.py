"""The latent store: one checksummed file a volume, verification, stores trained as one, and encoding shared over
ranks that resumes and adds.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ctflow
from ctflow_train import cli, latent_store
from ctflow_train.checkpoint import save_checkpoint
from ctflow_train.flow_data import BlockDataset, SamplingRules
from ctflow_train.latent_store import LatentStore, open_stores

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


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


def test_stores_of_one_encoder_train_as_one_and_others_are_refused(tiny, cache, tmp_path):
    dataset = BlockDataset(open_stores([cache, cache]), SamplingRules(tiny.BLOCK), 0)
    assert len(dataset) == 6 and sorted(dataset.volume(p)[1] for p in range(6)) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ctflow.CTFlowError, match="another VAE"):
        open_stores([cache, tiny.store_of_another_vae(cache, tmp_path)])
    assert len(open_stores([cache, tiny.store_of_another_vae(cache, tmp_path, 1e-3)])) == 2
    with pytest.raises(ctflow.CTFlowError, match="single-file latent cache"):
        LatentStore(save_checkpoint(tmp_path / "old.safetensors", {}, {}, {}, {}))


def test_encoding_shares_out_over_ranks_resumes_and_adds(tiny, data, vae_run, cache, tmp_path, monkeypatch, capsys):
    """Two ranks (as torchrun sets them) each encode their share; the last to finish merges the index. A rerun
    encodes only what is missing, and a rerun over more cases adds them."""
    out, vae, text = tmp_path / "store", vae_run[0] / "vae", ctflow.ModelConfig().text

    def build(rank, world, holdout=1, **options):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        return latent_store.build_store(data, vae, out, holdout, tiny.SIZE, text, log=lambda line: None, **options)

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
    tiny.store_of_another_vae(out, tmp_path).rename(tmp_path / "another")
    command = ["cache-latents", "--data", str(data), "--vae", str(vae), "--out", str(tmp_path / "another"), "--size",
               str(tiny.SIZE), "--holdout", "1"]
    assert cli.main(command) == 1 and "another VAE or text encoder" in capsys.readouterr().err


def test_limit_counts_patients_with_every_twin_of_theirs(tiny, twin_store, vae_run, tmp_path):
    """`cache-latents --limit 1` on a twin cohort keeps the first patient's three volumes, not the first volume."""
    out = tmp_path / "first"
    assert cli.main(["cache-latents", "--data", str(twin_store.parent / "data"), "--vae", str(vae_run[0] / "vae"),
                     "--out", str(out), "--size", str(tiny.SIZE), "--holdout", "0", "--limit", "1"]) == 0
    assert LatentStore(out).names == ["synth_0_00000", "synth_0_00000_with_emphysema",
                                      "synth_0_00000_with_right_consolidation"]
