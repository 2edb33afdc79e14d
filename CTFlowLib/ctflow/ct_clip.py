"""CT-CLIP's text tower as a plain `transformers` BertModel folder: the report encoder of the released CTFlow model.

CT-CLIP (github ibrahimethemhamamci/CT-CLIP) fine-tunes CXR-BERT (microsoft/BiomedVLP-CXR-BERT-specialized) inside
a pickled checkpoint whose `text_transformer.*` tensors are that BertModel. We read them with
torch.load(weights_only=True), which refuses anything but tensors and plain containers, and write safetensors with
a BertModel config and the CXR-BERT tokenizer files, so loading the result never runs downloaded code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ModelError
from .io import atomic_folder, refuse_foreign_folder

TEXT_PREFIX = "text_transformer."
HEAD_DIM = 64  # BERT-base and CXR-BERT: 768 / 12 heads; the weights do not record the head count
MAX_TOKENS = 512
_REMOTE_CODE_KEYS = ("auto_map",)  # a tokenizer config naming code to import: never copied


def read_ct_clip_text_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The BertModel tensors of a CT-CLIP checkpoint (prefix removed); refuses anything torch.load would execute."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise ModelError(f"CT-CLIP checkpoint {checkpoint} does not exist")
    try:
        data = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not a plain tensor file"
        raise ModelError(f"{checkpoint} is not a plain tensor checkpoint (torch.load with weights_only=True "
                         f"refused it: {str(exc).splitlines()[0]})") from exc
    for wrapper in ("state_dict", "model"):  # checkpoints saved by a trainer nest the state dict
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
    if not isinstance(data, dict):
        raise ModelError(f"{checkpoint} does not hold a state dict")
    text = {key[len(TEXT_PREFIX):]: value for key, value in data.items()
            if isinstance(key, str) and key.startswith(TEXT_PREFIX) and isinstance(value, torch.Tensor)}
    if "embeddings.word_embeddings.weight" not in text:
        raise ModelError(f"{checkpoint} has no {TEXT_PREFIX}* BERT weights: is it a CT-CLIP checkpoint?")
    text.pop("embeddings.position_ids", None)  # a buffer older transformers saved; recomputed
    return text


def bert_config_for(weights: dict[str, torch.Tensor], heads: int | None = None):
    """A BertConfig whose sizes are read off the tensors (the head count: hidden / 64 unless given)."""
    from transformers import BertConfig

    hidden = weights["embeddings.word_embeddings.weight"].shape[1]
    layers = len({key.split(".")[2] for key in weights if key.startswith("encoder.layer.")})
    heads = heads or hidden // HEAD_DIM
    if hidden % heads:
        raise ModelError(f"hidden size {hidden} is not divisible by {heads} attention heads")
    return BertConfig(
        vocab_size=weights["embeddings.word_embeddings.weight"].shape[0], hidden_size=hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=weights["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=weights["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=weights["embeddings.token_type_embeddings.weight"].shape[0], architectures=["BertModel"],
    )


def convert_ct_clip_text(checkpoint: Path, tokenizer: Path, out: Path, heads: int | None = None,
                         overwrite: bool = False) -> Path:
    """Write `out`: a BertModel folder (config.json, model.safetensors, tokenizer files) of CT-CLIP's text tower."""
    from transformers import BertModel, BertTokenizer

    out = Path(out)
    if out.exists() and not overwrite:
        raise ModelError(f"{out} already exists; choose another folder or pass --overwrite")
    refuse_foreign_folder(out, ("config.json", "model.safetensors"), "a text-encoder folder", ModelError)
    if not any((Path(tokenizer) / name).is_file() for name in ("vocab.txt", "tokenizer.json")):
        raise ModelError(f"{tokenizer} has no vocab.txt: give the CXR-BERT tokenizer folder "
                         "(microsoft/BiomedVLP-CXR-BERT-specialized)")
    weights = read_ct_clip_text_weights(checkpoint)
    config = bert_config_for(weights, heads)
    model = BertModel(config, add_pooling_layer="pooler.dense.weight" in weights)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ModelError(f"the {TEXT_PREFIX}* weights of {checkpoint} do not form a BertModel "
                         f"(missing {len(missing)}, unexpected {len(unexpected)}), e.g. {(missing or unexpected)[:3]}")
    text_tokenizer = BertTokenizer.from_pretrained(tokenizer, local_files_only=True, model_max_length=MAX_TOKENS)

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        text_tokenizer.save_pretrained(staging)
        settings = staging / "tokenizer_config.json"
        kept = {k: v for k, v in json.loads(settings.read_text(encoding="utf-8")).items() if k not in _REMOTE_CODE_KEYS}
        settings.write_text(json.dumps(kept, indent=2) + "\n", encoding="utf-8")

    return atomic_folder(out, fill, overwrite)
