"""Bad inputs and faults as a hostile but realistic user tries them (issue 14): each gives one line on stderr and
the stated exit code, fails before the model loads where it can, and leaves every file of the user's as it was.

Table-driven: a Case is an argv, the exit code, a fragment of the message, and the files it may write. Cases
marked held were already right before issue 14; the others failed then. Signals need a real process, so those
few cases run `python -m ctflow` (or a small writer) as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import pydoc
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

import ctflow
from ctflow import Geometry, Provenance, Volume, write_volume
from ctflow.cli import main
from ctflow.errors import CTFlowError

REPORT = "'Findings: A 9 mm nodule in the right upper lobe.'"
GEN = "generate --model {model} --steps 1 --slices 2 --seed 0 --device cpu"
OUT = "--out {tmp}/ct.nii.gz"


pytestmark = pytest.mark.usefixtures("one_thread")


def model_variant(source: Path, folder: Path, **changes) -> Path:
    """A copy of a model folder with config.json fields changed and its checksum line renewed."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    lines = [f"{digest}  config.json" if line.endswith("  config.json") else line
             for line in (folder / "checksums.sha256").read_text().splitlines()]
    (folder / "checksums.sha256").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {"model": tiny_model, "short_model": model_variant(tiny_model, root / "short", max_slices=6),
            "empty_model": model_variant(tiny_model, root / "empty", max_slices=0)}


# -- files the cases start from ----------------------------------------------------------------------------------


def small_volume(seed: int = 0, synthetic: bool = True) -> Volume:
    provenance = Provenance(report="Findings: Normal.", prompt="p", seed=seed, steps=1, sampler="euler", shift=1.0,
                            guidance=1.0, model="test", model_sha256="0" * 64, ctflow_version="0", block_slices=4)
    hu = np.random.default_rng(seed).integers(-1000, 400, (8, 16, 16)).astype(np.int16)
    return Volume(hu, Geometry((1.0, 1.0, 2.5)), provenance if synthetic else None)


def files(**named: bytes | str) -> Callable[[Path], None]:
    """Setup: write these files (relative names, `__` for `/`) into the case's folder."""

    def make(tmp: Path) -> None:
        for name, content in named.items():
            path = tmp / name.replace("__", "/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return make


def volumes(*names: str, folder: str = "") -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / folder).mkdir(exist_ok=True)
        for seed, name in enumerate(names):
            write_volume(small_volume(seed), tmp / folder / name)

    return make


def nifti(name: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), str(tmp / name))

    return make


def float_nifti(name: str, value: float) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        nib.save(nib.Nifti1Image(np.full((8, 8, 4), value, np.float32), np.eye(4)), str(tmp / name))

    return make


def nrrd_without_directions(name: str) -> Callable[[Path], None]:
    """A valid NRRD that places its voxels nowhere (spacings only): pynrrd writes it, ctflow cannot orient it."""
    def make(tmp: Path) -> None:
        import nrrd

        nrrd.write(str(tmp / name), np.zeros((8, 8, 4), np.int16), {"spacings": [1.0, 1.0, 2.0]})

    return make


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        for setup in setups:
            setup(tmp)

    return make


ONE_ROW = files(**{"r.csv": "id,report\na,Findings: x.\n"})  # a reports table of one row


def embedding(name: str, vector: np.ndarray, archive: bool = False) -> Callable[[Path], None]:
    """Setup: a precomputed report embedding, as .npy (or an .npz archive under the given name)."""
    def make(tmp: Path) -> None:
        with open(tmp / name, "wb") as handle:
            np.savez(handle, vector) if archive else np.save(handle, vector)

    return make


def a_folder(name: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).mkdir()


# -- faults injected into a run ----------------------------------------------------------------------------------


def preview_appears_beside_the_series(monkeypatch) -> None:
    """Another program writes p.png while the DICOM series is being written: neither is committed."""
    from ctflow import dicom

    original = dicom.dicom_writer

    def writer_then_collide(volume, *args, **kwargs):
        fill = original(volume, *args, **kwargs)

        def fill_then_collide(folder: Path) -> None:
            fill(folder)
            (folder.parent / "p.png").write_bytes(b"someone else's")

        return fill_then_collide

    monkeypatch.setattr(dicom, "dicom_writer", writer_then_collide)


def preview_fails(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ctflow.preview.render_preview", fail)


def ctrl_c_in(target: str, after: int = 0) -> Callable:
    """Press Ctrl-C on call number after + 1 of `target` (the calls before it run)."""

    def install(monkeypatch) -> None:
        original = pydoc.locate(target)
        calls = []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) > after:
                raise KeyboardInterrupt
            return original(*args, **kwargs)

        monkeypatch.setattr(target, interrupted)

    return install


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # placeholders: {tmp} the case's folder, {model}, {short_model} (max_slices 6), {empty_model} (0)
    code: int
    message: str | None  # a fragment of stderr
    setup: Callable[[Path], None] | None = None
    fault: Callable | None = None
    early: bool = True  # refused before any model is loaded
    written: tuple[str, ...] = ()  # what the command may add to {tmp}; everything there before stays as it was
    held: bool = False  # already right before issue 14


CASES = [
    # 4: absurd numbers
    Case("shift-inf", f"{GEN} --report {REPORT} {OUT} --shift inf", 1, "shift"),
    Case("shift-nan", f"{GEN} --report {REPORT} {OUT} --shift nan", 1, "shift"),
    Case("shift-negative", f"{GEN} --report {REPORT} {OUT} --shift -1", 1, "shift"),
    Case("shift-huge", f"{GEN} --report {REPORT} {OUT} --shift 1e300", 1, "shift"),
    Case("guidance-nan", f"{GEN} --report {REPORT} {OUT} --guidance nan", 1, "guidance"),
    Case("guidance-inf", f"{GEN} --report {REPORT} {OUT} --guidance inf", 1, "guidance"),
    Case("guidance-negative", f"{GEN} --report {REPORT} {OUT} --guidance -2", 1, "guidance"),
    Case("side-guidance-nan", f"{GEN} --report {REPORT} {OUT} --side-guidance nan", 1, "side guidance"),
    Case("side-guidance-inf", f"{GEN} --report {REPORT} {OUT} --side-guidance inf", 1, "side guidance"),
    Case("side-guidance-negative", f"{GEN} --report {REPORT} {OUT} --side-guidance -1", 1, "side guidance"),
    Case("steps-zero", f"{GEN} --report {REPORT} {OUT} --steps 0", 1, "steps"),
    Case("steps-huge", f"{GEN} --report {REPORT} {OUT} --steps 100000", 1, "steps"),
    Case("slices-zero", f"{GEN} --report {REPORT} {OUT} --slices 0", 1, "slice count"),
    Case("slices-negative", f"{GEN} --report {REPORT} {OUT} --slices -3", 1, "slice count"),
    Case("slices-huge", f"{GEN} --report {REPORT} {OUT} --slices 100000", 1, "slice"),
    Case("seed-negative", f"{GEN} --report {REPORT} {OUT} --seed -1", 1, "seed"),
    Case("device-cuda-absent", f"{GEN} --report {REPORT} {OUT} --device cuda", 1, "CUDA"),
    Case("device-cuda-index-absent", f"{GEN} --report {REPORT} {OUT} --device cuda:1", 1, "CUDA"),
    Case("embedding-for-a-token-model", "generate --model {model} --embedding {tmp}/e.npy --guidance 1 "
         f"--side-guidance 0 --slices 2 --device cpu {OUT}", 1, "reads token sequences",
         embedding("e.npy", np.ones(384, np.float32))),
    Case("embedding-npz-named-npy", "generate --model {model} --embedding {tmp}/e.npy --guidance 1 "
         f"--side-guidance 0 --slices 2 --device cpu {OUT}", 1, "not one .npy array",
         embedding("e.npy", np.ones(384, np.float32), archive=True)),
    Case("device-unknown", f"{GEN} --report {REPORT} {OUT} --device tpu", 1, "unknown device 'tpu'"),
    Case("batch-shift-inf", "batch {tmp}/r.csv --out {tmp}/out --model {model} --shift inf", 1, "shift",
         ONE_ROW),
    Case("batch-guidance-nan", "batch {tmp}/r.csv --out {tmp}/out --model {model} --guidance nan", 1, "guidance",
         ONE_ROW),
    Case("batch-side-guidance-huge", "batch {tmp}/r.csv --out {tmp}/out --model {model} --side-guidance 1e9", 1,
         "side guidance", ONE_ROW),
    # 7: the report file
    Case("report-dev-zero", f"{GEN} --report-file /dev/zero {OUT}", 1, "larger than"),
    Case("report-huge", f"{GEN} --report-file {{tmp}}/r.txt {OUT}", 1, "larger than",
         files(**{"r.txt": "Findings: " + "nodule " * 150_000})),
    Case("report-latin1", f"{GEN} --report-file {{tmp}}/r.txt {OUT}", 1, "not UTF-8",
         files(**{"r.txt": b"Findings: \xe9panchement pleural."}), held=True),
    Case("report-folder", f"{GEN} --report-file {{tmp}} {OUT}", 1, "report file", held=True),
    Case("report-nul", f"{GEN} --report-file {{tmp}}/r.txt {OUT}", 1, "binary",
         files(**{"r.txt": b"Findings: \x00\x00\x01 nodule"})),
    Case("report-missing", f"{GEN} --report-file {{tmp}}/none.txt {OUT}", 1, "does not exist", held=True),
    Case("report-blank", f"{GEN} --report '   ' {OUT}", 1, "the report is empty"),
    Case("report-chinese", f"{GEN} --report '右肺下叶可见结节，伴少量胸腔积液。' {OUT}", 0, "note: the text encoder",
         early=False, written=("ct.nii.gz",)),
    Case("report-emoji", f"{GEN} --report '😀🫁💀🫀 🫁🫁' {OUT}", 0, "note: the text encoder", early=False,
         written=("ct.nii.gz",)),
    # 10: the output path, checked before the model loads
    Case("out-exists", f"{GEN} --report {REPORT} {OUT}", 1, "already exists", files(**{"ct.nii.gz": "precious"}),
         held=True),
    Case("out-is-folder-overwrite", f"{GEN} --report {REPORT} {OUT} --overwrite", 1, "is a folder",
         a_folder("ct.nii.gz")),
    Case("out-in-proc", f"{GEN} --report {REPORT} --out /proc/ct.nii.gz", 1, "cannot write"),
    Case("out-in-sys", f"{GEN} --report {REPORT} --out /sys/ct.nii.gz", 1, "cannot write"),
    Case("out-folder-missing", f"{GEN} --report {REPORT} --out {{tmp}}/none/ct.nii.gz", 1, "does not exist", held=True),
    Case("out-bad-type", f"{GEN} --report {REPORT} --out {{tmp}}/ct.txt", 1, "unsupported", held=True),
    Case("out-name-247", f"{GEN} --report {REPORT} --out {{tmp}}/{'n' * 240}.nii.gz", 0, None, early=False,
         written=(f"{'n' * 240}.nii.gz",)),
    Case("out-name-300", f"{GEN} --report {REPORT} --out {{tmp}}/{'n' * 293}.nii.gz", 1, "too long", held=True),
    Case("preview-exists", f"{GEN} --report {REPORT} {OUT} --preview {{tmp}}/p.png", 1, "already exists",
         files(**{"p.png": "precious"}), held=True),
    Case("preview-bad-type", f"{GEN} --report {REPORT} {OUT} --preview {{tmp}}/p.jpg", 1, "unsupported", held=True),
    # 6: all or nothing
    Case("preview-fails", f"{GEN} --report {REPORT} {OUT} --preview {{tmp}}/p.png", 1, "No space left",
         fault=preview_fails, early=False),
    Case("dicom-preview-taken-meanwhile", f"{GEN} --report {REPORT} --out {{tmp}}/ct.dcm --preview {{tmp}}/p.png", 1,
         "already exists", fault=preview_appears_beside_the_series, early=False, written=("p.png",)),
    Case("ctrl-c-in-preview", f"{GEN} --report {REPORT} {OUT} --preview {{tmp}}/p.png", 130, "nothing was written",
         fault=ctrl_c_in("ctflow.preview.render_preview"), early=False),
    Case("ctrl-c-in-generation", f"{GEN} --report {REPORT} {OUT}", 130, "nothing was written",
         fault=ctrl_c_in("ctflow.pipeline.CTFlowPipeline.generate"), early=False, held=True),
    Case("qa-ctrl-c-halfway", "qa {tmp}/v", 130, "nothing was written", volumes("a.nii.gz", "b.nii.gz", folder="v"),
         fault=ctrl_c_in("ctflow.qa.assess", after=1)),
    Case("qa-bad-file-goes-on", "qa {tmp}/v", 1, "bad.nii.gz",
         both(volumes("good.nii.gz", folder="v"), files(**{"v__bad.nii.gz": "not a volume"})),
         written=("v/qa", "v/qa/good.qa.json", "v/qa/good.qa.png", "v/qa/qa.json")),
    Case("qa-reports-exist", "qa {tmp}/v", 1, "already exists",
         both(volumes("a.nii.gz", folder="v"), files(**{"v__qa__a.qa.json": "mine"})), held=True),
    # 5: temporary files are not volumes
    Case("qa-skips-temp-files", "qa {tmp}/v", 0, None,
         both(volumes("a.nii.gz", folder="v"), files(**{"v__.a.nii.gz.x1y2.tmp.nii.gz": "half written",
                                                       "v__.ctflow-tmp.123.x1y2": "half written"})),
         written=("v/qa", "v/qa/a.qa.json", "v/qa/a.qa.png", "v/qa/qa.json")),
    # 8: bad tables and numbers
    Case("batch-slices-huge-row", "batch {tmp}/r.csv --out {tmp}/out --model {model}", 1, "from 1 to 2048",
         files(**{"r.csv": "id,report,slices\na,Findings: x.,4\nb,Findings: y.,99999\n"})),
    Case("qa-nrrd-without-orientation-goes-on", "qa {tmp}/v", 1, "no 'space directions'",
         both(volumes("good.nii.gz", folder="v"), nrrd_without_directions("v/flat.nrrd")),
         written=("v/qa", "v/qa/good.qa.json", "v/qa/good.qa.png", "v/qa/qa.json")),
    Case("qa-nan-voxels", "qa {tmp}/nan.nii.gz", 1, "not numbers (NaN or infinite)",
         float_nifti("nan.nii.gz", np.nan)),
    Case("batch-slices-word", "batch {tmp}/r.csv --out {tmp}/out --model {model}", 1, "line 3",
         files(**{"r.csv": "id,report,slices\na,Findings: x.,4\nb,Findings: y.,ten\n"})),
    Case("batch-slices-fraction", "batch {tmp}/r.csv --out {tmp}/out --model {model}", 1, "slices",
         files(**{"r.csv": "id,report,slices\na,Findings: x.,2.5\n"})),
    Case("batch-jsonl-list", "batch {tmp}/r.jsonl --out {tmp}/out --model {model}", 1, "line 1",
         files(**{"r.jsonl": "[1, 2]\n"})),
    Case("batch-jsonl-string", "batch {tmp}/r.jsonl --out {tmp}/out --model {model}", 1, "not a JSON object",
         files(**{"r.jsonl": '{"report": "Findings: x."}\n"Findings: y."\n'})),
    Case("batch-jsonl-broken-line-2", "batch {tmp}/r.jsonl --out {tmp}/out --model {model}", 1, "line 2",
         files(**{"r.jsonl": '{"report": "Findings: x."}\n{"report": \n'})),
    Case("batch-jsonl-blank-then-broken", "batch {tmp}/r.jsonl --out {tmp}/out --model {model}", 1, "line 3",
         files(**{"r.jsonl": '{"report": "Findings: x."}\n\n{oops}\n'})),
    Case("qa-block-slices-negative", "qa {tmp}/v --block-slices -3", 1, "block", volumes("a.nii.gz", folder="v")),
    Case("metrics-size-zero", "metrics {tmp}/v --reference {tmp}/v --size 0", 1, "size",
         volumes("a.nii.gz", folder="v")),
    Case("metrics-size-negative", "metrics {tmp}/v --reference {tmp}/v --size -8", 1, "size",
         volumes("a.nii.gz", folder="v")),
    Case("metrics-slices-per-axis-zero", "metrics {tmp}/v --reference {tmp}/v --slices-per-axis 0", 1,
         "slices-per-axis", volumes("a.nii.gz", folder="v")),
    Case("metrics-features-bad-seed", "metrics {tmp}/v --reference {tmp}/v --features random:abc", 1, "random:abc",
         volumes("a.nii.gz", folder="v")),
    Case("metrics-nothing-to-do", "metrics {tmp}/v", 1, "nothing to compute", volumes("a.nii.gz", folder="v"),
         held=True),
    # 9: batch tables and folders
    Case("batch-blank-report-row", "batch {tmp}/r.csv --out {tmp}/out --model {model}", 1, "line 2",
         files(**{"r.csv": "id,report\na,   \nb,Findings: y.\n"})),
    Case("batch-empty-report-row", "batch {tmp}/r.csv --out {tmp}/out --model {model}", 1, "no report text",
         files(**{"r.csv": "id,report\na,\n"}), held=True),
    Case("batch-duplicate-ids", "batch {tmp}/r.csv --out {tmp}/out --model {model}", 1, "same id",
         files(**{"r.csv": "id,report\na,Findings: x.\na,Findings: y.\n"}), held=True),
    Case("batch-seeds-zero", "batch {tmp}/r.csv --out {tmp}/out --model {model} --seeds 0", 1, "--seeds",
         ONE_ROW, held=True),
    Case("batch-table-missing", "batch {tmp}/none.csv --out {tmp}/out --model {model}", 1, "does not exist",
         held=True),
    Case("batch-table-type", "batch {tmp}/r.xlsx --out {tmp}/out --model {model}", 1, "unsupported table",
         files(**{"r.xlsx": "x"}), held=True),
    Case("batch-out-is-a-file", "batch {tmp}/r.csv --out {tmp}/r.csv --model {model}", 1, "not a folder",
         ONE_ROW),
    Case("batch-out-holds-the-users-files", "batch {tmp}/r.csv --out {tmp}/mine --model {model}", 1,
         "holds files but no batch", files(**{"r.csv": "id,report\na,Findings: x.\n", "mine__a_s0.nii.gz": "my CT",
                                             "mine__manifest.csv": "my notes"})),
    Case("batch-merge-only-in-no-batch", "batch {tmp}/r.csv --out {tmp}/mine --merge-only", 1,
         "give the folder of a batch", files(**{"r.csv": "id,report\na,Findings: x.\n", "mine__manifest.csv": "mine"})),
    Case("batch-merge-only-in-no-folder", "batch {tmp}/r.csv --out {tmp}/none --merge-only", 1, "does not exist",
         ONE_ROW),
    Case("batch-seeds-huge", "batch {tmp}/r.csv --out {tmp}/out --model {model} --seeds 1000000000", 1,
         "more than the 1,000,000 volumes", ONE_ROW),
    Case("batch-seed-negative", "batch {tmp}/r.csv --out {tmp}/out --model {model} --seed -1", 1, "--seed must be",
         ONE_ROW),
    Case("batch-seed-past-the-last", f"batch {{tmp}}/r.csv --out {{tmp}}/out --model {{model}} --seed {2**63 - 1} "
         "--seeds 2", 1, "--seed must be", ONE_ROW),
    Case("batch-out-in-sys", "batch {tmp}/r.csv --out /sys/ctflow-batch --model {model}", 1, "cannot write",
         ONE_ROW),
    Case("batch-out-under-a-file", "batch {tmp}/r.csv --out {tmp}/r.csv/out --model {model}", 1, "is a file",
         ONE_ROW),
    Case("qa-block-slices-huge", "qa {tmp}/v --block-slices 100000000", 1, "block", volumes("a.nii.gz", folder="v")),
    Case("qa-out-is-a-file", "qa {tmp}/v --out {tmp}/f.txt", 1, "is a file",
         both(volumes("a.nii.gz", folder="v"), files(**{"f.txt": "mine"}))),
    Case("out-folder-is-a-file", f"{GEN} --report {REPORT} --out {{tmp}}/f.txt/ct.nii.gz", 1, "is a file, not a folder",
         files(**{"f.txt": "mine"})),
    Case("batch-every-item-fails", "batch {tmp}/r.csv --out {tmp}/out --model {short_model} --steps 1", 1, "a_s0",
         files(**{"r.csv": "id,report,slices\na,Findings: x.,100\n"}), early=False),  # more than the model makes
    # 11: checked before the model loads
    Case("revision-with-a-folder", f"{GEN} --report {REPORT} {OUT} --revision main", 1, "--revision"),
    Case("info-revision-with-a-folder", "info --model {model} --revision v1", 1, "--revision"),
    Case("slices-over-the-model-max", f"{GEN.replace('{model}', '{short_model}')} --report {REPORT} {OUT} "
         "--slices 10", 1, "at most 6"),
    Case("config-max-slices-zero", f"generate --model {{empty_model}} --report {REPORT} {OUT}", 1, "max_slices"),
    Case("qa-block-slices-zero", "qa {tmp}/v --block-slices 0", 1, "block", volumes("a.nii.gz", folder="v")),
    Case("qa-2d-file", "qa {tmp}/flat.nii.gz", 1, "not a 3-D volume", nifti("flat.nii.gz", (8, 8))),
    Case("qa-4d-file", "qa {tmp}/series.nii.gz", 1, "not a 3-D volume", nifti("series.nii.gz", (8, 8, 4, 2))),
    Case("qa-reference-not-json", "qa {tmp}/v --reference {tmp}/ref.json", 1, "ref.json",
         both(volumes("a.nii.gz", folder="v"), files(**{"ref.json": "{oops"}))),
    Case("qa-missing", "qa {tmp}/none", 1, "does not exist", held=True),
    Case("qa-empty-folder", "qa {tmp}/v", 1, "holds no volumes", a_folder("v"), held=True),
    Case("model-missing", f"generate --model {{tmp}}/none --report {REPORT} {OUT}", 1, "not found", held=True),
    # 3 (the CLI's share): metrics --out
    Case("metrics-out-exists", "metrics {tmp}/v --reference {tmp}/v --size 32 --slices-per-axis 2 --out {tmp}/m.json",
         1, "already exists", both(volumes("a.nii.gz", "b.nii.gz", folder="v"), files(**{"m.json": "mine"}))),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`, with a hash of each file's bytes."""
    return {path.relative_to(folder).as_posix(): "folder" if path.is_dir() else
            hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.rglob("*")}


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the request was checked")


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, models, tmp_path, monkeypatch, capsys):
    if case.setup:
        case.setup(tmp_path)
    before = snapshot(tmp_path)
    if case.early:
        monkeypatch.setattr(ctflow.CTFlowPipeline, "from_pretrained", refuse_to_load)
    if case.fault:
        case.fault(monkeypatch)
    argv = [part.format(tmp=tmp_path, **models) for part in shlex.split(case.argv)]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert "Traceback" not in err
    if case.message:
        assert case.message in err
    errors = [line for line in err.splitlines() if line.startswith("ctflow: error")]
    if case.code == 1:
        assert len(errors) == 1, err  # one line, not a cascade
    after = snapshot(tmp_path)
    assert {name: after[name] for name in before if name in after} == before  # nothing of the user's changed
    assert sorted(set(after) - set(before)) == sorted(case.written)  # and nothing else written


# -- cases that need more than an argv ---------------------------------------------------------------------------


def test_metrics_out_is_replaced_only_with_overwrite(tmp_path, capsys):
    volumes("a.nii.gz", "b.nii.gz", folder="v")(tmp_path)
    (tmp_path / "m.json").write_text("mine")
    argv = ["metrics", str(tmp_path / "v"), "--reference", str(tmp_path / "v"), "--size", "32", "--slices-per-axis",
            "2", "--out", str(tmp_path / "m.json")]
    assert main(argv) == 1 and (tmp_path / "m.json").read_text() == "mine"
    assert main(argv + ["--overwrite"]) == 0
    assert "fid_2_5d" in json.loads((tmp_path / "m.json").read_text())


def test_a_non_finite_volume_is_never_written(tmp_path):
    for bad in (np.nan, np.inf):
        hu = np.zeros((4, 8, 8), np.float32)
        hu[1, 2, 3] = bad
        with pytest.raises(CTFlowError, match="non-finite"):
            write_volume(Volume(hu, Geometry((1.0, 1.0, 1.0)), None), tmp_path / "ct.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_outputs_nan_is_refused(tiny_pipeline, steered):
    broken = steered(0, 0)
    broken.denoiser.forward = lambda x, t, cond: torch.full_like(x, float("nan"))
    with pytest.raises(CTFlowError, match="non-finite"):
        broken.generate(ctflow.GenerationRequest("Findings: Normal.", slices=4, steps=1, seed=0))


def test_a_batch_item_claimed_by_another_process_is_left_to_it(tiny_model, tmp_path, capsys):
    """Two batches on one folder: an item another process is making (its claim is locked) is not made twice."""
    from ctflow import batch

    (tmp_path / "r.csv").write_text("id,report,slices\na,Findings: x.,2\nb,Findings: y.,2\n")
    items = batch.plan_items(batch.read_reports(tmp_path / "r.csv"), 1)
    folder = batch.BatchFolder(tmp_path / "out")
    folder.create()
    with folder.claim(items[0]) as mine:  # the other process holds item a
        assert mine
        code = main(["batch", str(tmp_path / "r.csv"), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
                     "--steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 0 and "a_s0 busy" in err
    assert not folder.volume(items[0]).exists() and folder.finished(items[1])
    assert not (tmp_path / "out" / batch.MANIFEST_CSV).exists()  # the other process merges when it finishes


def test_a_stale_temp_file_is_removed_by_the_next_write_in_its_folder(tmp_path):
    from ctflow.io import temp_prefix

    stale, other = tmp_path / f"{temp_prefix(999999999)}abcd", tmp_path / ".notes.tmp"
    stale.write_text("left by a killed run")
    series = tmp_path / f"{temp_prefix(999999999)}efgh"  # a DICOM series folder a killed run was writing
    series.mkdir()
    (series / "0001.dcm").write_text("half a series")
    other.write_text("not ours")
    old = time.time() - 3600
    for path in (stale, series):
        os.utime(path, (old, old))
    write_volume(small_volume(), tmp_path / "ct.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "ct.nii.gz"]


# -- signals: real processes -------------------------------------------------------------------------------------


def ctflow_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ctflow", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, text: str, limit_s: float = 120.0) -> str:
    """Read stderr lines until one holds `text`."""
    seen, started = [], time.monotonic()
    while time.monotonic() - started < limit_s:
        line = process.stderr.readline()
        seen.append(line)
        if text in line or not line:
            break
    assert text in seen[-1], "".join(seen)
    return "".join(seen)


@pytest.mark.parametrize("sig, code, message, held", [
    (signal.SIGINT, 130, "cancelled; nothing was written", True),
    (signal.SIGTERM, 143, "terminated; nothing was written", False),
])
def test_a_signal_during_generation_stops_cleanly(tiny_model, tmp_path, sig, code, message, held):
    process = ctflow_process("generate", "--model", str(tiny_model), "--report", "Findings: Normal.", "--slices",
                             "500", "--steps", "50", "--out", str(tmp_path / "ct.nii.gz"), "--device", "cpu")
    wait_for(process, "block 1/")
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


KILLED_WRITER = """
import os, signal, sys
import numpy as np
import ctflow.io
from ctflow import Geometry, Volume
def killed(volume, path, *args, **kwargs):
    path.write_bytes(b"half a volume")
    os.kill(os.getpid(), signal.SIGKILL)
ctflow.io._write_nifti = killed
ctflow.io.write_volume(Volume(np.zeros((4, 8, 8), np.int16), Geometry((1.0, 1.0, 1.0)), None), sys.argv[1])
"""

WRITER = """
import sys
import numpy as np
import ctflow.io
from ctflow import Geometry, Volume
ctflow.io.write_volume(Volume(np.zeros((4, 8, 8), np.int16), Geometry((1.0, 1.0, 1.0)), None), sys.argv[1])
"""


def test_sigkill_during_a_write_leaves_nothing_a_reader_takes_for_a_volume(tmp_path, capsys):
    write_volume(small_volume(), tmp_path / "done.nii.gz")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "ct.nii.gz")])
    assert killed.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "done.nii.gz")
    assert len(leftovers) == 1 and not (tmp_path / "ct.nii.gz").exists()  # the killed write left its temp file
    assert main(["qa", str(tmp_path), "--out", str(tmp_path / "qa")]) == 0  # ... which qa does not read
    assert json.loads((tmp_path / "qa" / "qa.json").read_text())["summary"]["volumes"] == 1
    subprocess.run([sys.executable, "-c", WRITER, str(tmp_path / "next.nii.gz")], check=True)  # the next run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.nii.gz", "next.nii.gz", "qa"]


def test_a_batch_killed_midway_resumes_with_the_unfinished_items(tiny_model, tmp_path, capsys):
    """Held before issue 14: SIGKILL after the first item, then the same command makes only the rest."""
    (tmp_path / "r.csv").write_text("id,report,slices\na,Findings: x.,2\nb,Findings: y.,200\nc,Findings: z.,2\n")
    argv = ["batch", str(tmp_path / "r.csv"), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
            "--steps", "10", "--device", "cpu"]
    process = ctflow_process(*argv)
    wait_for(process, "a_s0 made")
    process.kill()
    process.communicate(timeout=60)
    assert main(argv) == 0
    assert "made 2, skipped 1 finished" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"]) == 3


def test_a_batch_resumed_with_other_options_or_table_is_refused_before_the_model_loads(tiny_model, tmp_path,
                                                                                        capsys, monkeypatch):
    (tmp_path / "r.csv").write_text("id,report,slices\na,Findings: x.,2\n")
    argv = ["batch", str(tmp_path / "r.csv"), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
            "--steps", "2", "--device", "cpu"]
    assert main(argv) == 0
    capsys.readouterr()

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("ctflow.cli.load_pipeline", load)
    assert main([*argv[:-4], "--steps", "3", "--device", "cpu"]) == 1
    assert "holds a batch made with other settings (steps)" in capsys.readouterr().err
    (tmp_path / "r.csv").write_text("id,report,slices\na,Findings: y.,2\n")
    assert main(argv) == 1
    assert "a_s0 were made from another report or length" in capsys.readouterr().err


def test_two_batches_on_one_folder_make_each_item_once(tiny_model, tmp_path, capsys):
    """A `ctflow batch` process and a second one started on the same --out while it runs share the items instead
    of doubling them; the last to finish merges the manifest."""
    rows = "".join(f"r{k},Findings: nodule {k}.,24\n" for k in range(6))
    (tmp_path / "r.csv").write_text("id,report,slices\n" + rows)
    argv = ["batch", str(tmp_path / "r.csv"), "--out", str(tmp_path / "out"), "--model", str(tiny_model),
            "--steps", "4", "--device", "cpu"]
    other = ctflow_process(*argv)
    wait_for(other, "item 1/6")
    assert main(argv) == 0
    out, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    made = [int(text.split("made ")[1].split(",")[0]) for text in (out, capsys.readouterr().out)]
    assert sum(made) == 6, made  # each item made once, by one or the other
    assert len(json.loads((tmp_path / "out" / "manifest.json").read_text())["rows"]) == 6


def test_a_batch_whose_every_item_failed_says_nothing_was_written(models, tmp_path, capsys):
    """Not "manifest not merged yet": the folder it made is gone again."""
    (tmp_path / "r.csv").write_text("id,report,slices\na,Findings: x.,100\n")  # more than short_model makes
    argv = ["batch", str(tmp_path / "r.csv"), "--out", str(tmp_path / "out"), "--model", str(models["short_model"]),
            "--steps", "1", "--device", "cpu"]
    assert main(argv) == 1
    said = capsys.readouterr().out
    assert "nothing written" in said and "not merged" not in said and not (tmp_path / "out").exists()
