"""Model folders: save/load, checksums, safetensors only, and hub ids resolved from a local cache."""

import json
import shutil

import huggingface_hub
import pytest
import torch

import ctflow
from ctflow import CTFlowPipeline, GenerationRequest, ModelError
from ctflow.errors import CorruptModelError
from ctflow.checksums import CHECKSUMS, write_checksums
from ctflow.hub import default_model, resolve_model
from ctflow.model_folder import WEIGHTS, model_sha256, verify_model_folder


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


def test_saved_weights_load_back_identically(tiny_model, tiny_pipeline):
    from safetensors.torch import load_file

    saved = load_file(tiny_model / WEIGHTS)
    assert saved.keys() == tiny_pipeline.denoiser.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in tiny_pipeline.denoiser.state_dict().items())
    assert (tiny_model / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tiny_model.rglob("*.bin")) and not list(tiny_model.rglob("*.pt"))


def test_a_saved_model_is_readable_by_every_user(tiny_model):
    for path in [tiny_model, *tiny_model.rglob("*")]:
        assert path.stat().st_mode & 0o444 == 0o444, path  # others read a model shared on a workstation


def test_every_file_is_covered_by_the_checksums(tiny_model):
    listed = {line.split("  ")[1] for line in (tiny_model / CHECKSUMS).read_text().splitlines()}
    files = {p.relative_to(tiny_model).as_posix() for p in tiny_model.rglob("*") if p.is_file()} - {CHECKSUMS}
    assert listed == files


def test_a_modified_weight_file_is_refused(model_copy):
    data = bytearray((model_copy / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (model_copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CorruptModelError, match="does not match its checksum"):
        CTFlowPipeline.from_pretrained(model_copy)


def test_the_model_hash_names_all_that_generates_and_not_the_card(model_copy, tiny_pipeline):
    """Provenance's model_sha256: another autoencoder (or tuned text layers) is another generator, a card edit not."""
    first = model_sha256(verify_model_folder(model_copy))
    assert tiny_pipeline.model_sha256 == first and tiny_pipeline.info()["model_sha256"] == first
    (model_copy / "README.md").write_text("# the same model, described again\n")
    write_checksums(model_copy)
    assert model_sha256(verify_model_folder(model_copy)) == first
    vae_config = model_copy / "vae" / "config.json"
    vae_config.write_text(vae_config.read_text() + "\n")  # any change to a file the model reads
    write_checksums(model_copy)
    assert model_sha256(verify_model_folder(model_copy)) != first
    assert model_sha256(verify_model_folder(model_copy)) == CTFlowPipeline.from_pretrained(model_copy).model_sha256


@pytest.mark.parametrize("damage, message", [
    (lambda m: (m / CHECKSUMS).unlink(), "no checksums.sha256"),
    (lambda m: (m / "vae" / "config.json").unlink(), "listed in checksums.sha256 but missing"),
])
def test_missing_files_are_refused(model_copy, damage, message):
    damage(model_copy)
    with pytest.raises(CorruptModelError, match=message):
        CTFlowPipeline.from_pretrained(model_copy)


def test_weights_that_do_not_fit_the_config_are_refused(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["denoiser"]["depth"] = 2
    (model_copy / "config.json").write_text(json.dumps(config))
    write_checksums(model_copy)
    with pytest.raises(CorruptModelError, match="does not fit the denoiser"):
        CTFlowPipeline.from_pretrained(model_copy)


def test_not_a_model_and_no_bundled_model(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(tmp_path / "nothing")
    monkeypatch.delenv("CTFLOW_MODEL", raising=False)
    monkeypatch.setattr(ctflow.hub, "BUNDLED_MODEL", tmp_path / "absent")
    with pytest.raises(ModelError, match="no trained model is bundled"):
        default_model()
    monkeypatch.setenv("CTFLOW_MODEL", str(tmp_path))
    assert default_model() == tmp_path


def fake_hub_cache(cache, repo_id, model_folder, revisions):
    """Lay out a model as huggingface_hub caches a download: snapshots/<commit>/..., refs/<name> -> commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, commit in revisions.items():
        shutil.copytree(model_folder, repo / "snapshots" / commit, dirs_exist_ok=True)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)


def test_hub_ids_resolve_from_the_local_cache_offline(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    main, tagged = "a" * 40, "b" * 40
    fake_hub_cache(tmp_path, "someone/ctflow-tiny", tiny_model, {"main": main, "v1": tagged})
    pipeline = CTFlowPipeline.from_pretrained("someone/ctflow-tiny", local_files_only=True)
    assert pipeline.model_id == "someone/ctflow-tiny"
    assert pipeline.generate(GenerationRequest("Normal chest CT.", slices=2, seed=0, steps=1)).shape[0] == 2
    assert resolve_model("someone/ctflow-tiny", revision="v1", local_files_only=True).name == tagged
    with pytest.raises(ModelError, match="not in the local model cache"):
        resolve_model("someone/uncached", local_files_only=True)


def test_saving_the_same_model_again_writes_the_same_bytes(tmp_path):
    from ctflow.testing import create_random_model

    def contents(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    first, *others = [contents(create_random_model(tmp_path / f"copy{i}", "tiny", seed=0)) for i in range(6)]
    assert all(other == first for other in others)  # a re-export can be checked by its checksums


def test_overwrite_replaces_a_model_folder_never_a_folder_of_other_files(tmp_path):
    """A slip of --out with --overwrite (import-released, convert-ct-clip, export) must not delete a user's files."""
    from ctflow.testing import create_random_model

    documents = tmp_path / "documents"
    (documents / "sub").mkdir(parents=True)
    (documents / "thesis.txt").write_text("mine")
    with pytest.raises(ctflow.CTFlowError, match="is not a model folder .*never replaced, even when asked"):
        create_random_model(documents, "tiny", overwrite=True)
    assert (documents / "thesis.txt").read_text() == "mine" and (documents / "sub").is_dir()
    model = create_random_model(tmp_path / "model", "tiny", seed=0)
    again = create_random_model(model, "tiny", seed=1, overwrite=True)  # a model folder is replaced when asked
    verify_model_folder(again)
    (tmp_path / "empty").mkdir()
    verify_model_folder(create_random_model(tmp_path / "empty", "tiny", overwrite=True))
