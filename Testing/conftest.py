"""Shared fixtures: a tiny random CTFlow model on disk (real folder, real MiniLM text encoder) and its pipeline."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# The Ctrl-C tests send SIGINT as a terminal would. A suite started in the background (`make test &`, nohup) inherits
# SIGINT ignored, and so would every process it starts, which then never sees the signal: restore Python's handler,
# so children start with the default action, as from a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
    from ctflow.testing import create_random_model

    return create_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


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
    from ctflow.conventions import END_HU

    class SteerTo(torch.nn.Module):
        """(z - target) / t is the exact rectified-flow velocity towards `target`, so every solver lands on it."""

        def __init__(self, autoencoder, end_block, end_frame):
            super().__init__()
            self.tissue = autoencoder.constant_latent(40.0)
            self.white = autoencoder.constant_latent(END_HU)
            self.end_block, self.end_frame, self.block = end_block, end_frame, -1
            self.first_slices = []
            self.x_embed = torch.nn.Linear(1, 1)  # gives the stand-in a dtype like the real model

        def prepare(self, previous, text, mask, first_slice, code=None):
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
                                     base.text_encoder, base.model_id, base.model_sha256)
        copy.denoiser = SteerTo(base.autoencoder, end_block, end_frame)
        return copy

    return make


RELEASE_DATA = Path(__file__).parent / "data" / "ctflow_release"  # the original code's outputs (its README.md)


@pytest.fixture(scope="session")
def released_downloads(tmp_path_factory):
    """What a user of the published CTFlow model downloads, tiny and random: the released denoiser folder (the
    fixture), a VAE with the FLUX.1 configuration but two small stages (2x down: 8x8 latents are 16x16 slices), a
    CT-CLIP checkpoint whose text_transformer.* is a one-layer 768-d BERT, and a CXR-BERT-style tokenizer folder."""
    import json
    import shutil
    from types import SimpleNamespace

    import torch
    from diffusers import AutoencoderKL
    from transformers import BertConfig, BertModel

    from ctflow.autoencoder import VAE_PRESETS

    root = tmp_path_factory.mktemp("downloads")
    denoiser = Path(shutil.copytree(RELEASE_DATA / "tiny_a", root / "checkpoint-680000" / "denoiser_ema"))
    torch.manual_seed(0)
    flux = {**VAE_PRESETS["flux"], "block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
    AutoencoderKL(**flux).save_pretrained(root / "flux_vae", safe_serialization=True)
    tokenizer = root / "cxr_bert"  # as the hub repo holds it: vocab.txt and a tokenizer_config.json naming code
    tokenizer.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "findings", ":", "right", "pleural", "effusion", ".",
             "no", "acute", "normal", "heart", "size", "emphysema", "impression", "nodule", "lung", "left"]
    (tokenizer / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": True, "tokenizer_class": "BertTokenizer", "auto_map": {"AutoTokenizer": "x.Y"}}))
    bert = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                intermediate_size=64, max_position_embeddings=64)).eval()
    state = {f"text_transformer.{key}": value for key, value in bert.state_dict().items()}
    state["text_transformer.embeddings.position_ids"] = torch.arange(64)[None]  # older transformers saved it
    state["visual_transformer.to_patch.weight"] = torch.randn(8, 8)  # CT-CLIP's other towers: ignored
    state["to_text_latent.weight"] = torch.randn(512, 768)
    torch.save(state, root / "CT-CLIP_v2.pt")
    return SimpleNamespace(denoiser=denoiser, vae=root / "flux_vae", ct_clip=root / "CT-CLIP_v2.pt",
                           tokenizer=tokenizer, bert=bert, root=root)


@pytest.fixture(scope="session")
def released_model(released_downloads, tmp_path_factory) -> Path:
    """The tiny downloads through `ctflow convert-ct-clip` and `ctflow import-released`: a model folder."""
    from ctflow.cli import main

    d = released_downloads
    text, out = d.root / "ct-clip-text", tmp_path_factory.mktemp("models") / "ctflow-released"
    assert main(["convert-ct-clip", str(d.ct_clip), "--tokenizer", str(d.tokenizer), "--out", str(text)]) == 0
    assert main(["import-released", "--denoiser", str(d.denoiser), "--vae", str(d.vae), "--text-encoder", str(text),
                 "--out", str(out)]) == 0
    return out
