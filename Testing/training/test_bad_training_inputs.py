"""`ctflow-train` on bad inputs: one clear line, a non-zero exit, no traceback, nothing left behind and nothing of
the user's replaced (issue 14, items 3 and 8).

Each case runs the real command in-process (`ctflow_train.cli.main`) against a tiny prepared folder and tiny
finished `vae` and `flow` runs, and checks exit code, a fragment of the one stderr line, which paths must not
have appeared, and that every file of the finished runs is unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctflow.checksums import sha256_file
from ctflow.report import Report
from ctflow.volume import Geometry, Volume
from ctflow_train import cli
from ctflow_train.checkpoint import read_meta
from ctflow_train.dataset import INDEX, DatasetWriter
from ctflow_train.evaluate import ModelEvaluation

SIZE = 16
VAE = ["--preset", "tiny", "--size", str(SIZE), "--crop", str(SIZE), "--steps", "2", "--batch", "2", "--adv-start", "1",
       "--holdout", "1", "--warmup", "1", "--eval-slices", "4", "--eval-every", "1", "--threads", "1"]
FLOW = ["--preset", "tiny", "--block", "4", "--batch", "2", "--steps", "2", "--warmup", "1", "--save-every", "2",
        "--threads", "1"]


FIGURE = ["report-figure", "--reports", "{root}/report.txt", "--normal", "{root}/normal.txt"]  # report files: `world`


def run_train(argv: list[str], capsys) -> tuple[int | str, str]:
    """Exit code (or 'traceback: ...' when an exception escaped) and stderr of `ctflow-train ARGV`, in-process."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    except BaseException as exc:  # noqa: BLE001 - an escaped exception is what these tests look for
        code = f"traceback: {type(exc).__name__}: {exc}"
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) if p.is_file() else "<dir>" for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """data/ (a prepared folder of 3 patients), vae/ and flow/ (finished runs), latents/ (a latent store), ctrate/ (an
    empty CT-RATE tree with a reports CSV); built once, through the real commands."""
    root = tmp_path_factory.mktemp("world")
    torch.set_num_threads(1)
    with DatasetWriter(root / "data") as writer:
        for n in range(3):
            hu = np.full((12, SIZE, SIZE), -1000, np.int16)
            hu[:8, 4:12, 3:13] = 40 + 10 * n
            hu[8:] = 1000  # white end slices
            mask = (hu[:8] == 40).astype(np.uint8) if n == 0 else None  # one patient with a finding mask
            writer.add(f"p{n}", Volume(hu, Geometry((2.0, 2.0, 2.5)), None), Report(f"Patient {n}.", "Normal."),
                       finding_mask=mask)
    for argv in (["vae", "--data", str(root / "data"), "--out", str(root / "vae"), *VAE],
                 ["cache-latents", "--data", str(root / "data"), "--vae", str(root / "vae" / "vae"), "--out",
                  str(root / "latents"), "--holdout", "1", "--size", str(SIZE)],
                 ["flow", "--cache", str(root / "latents"), "--out", str(root / "flow"), *FLOW]):
        assert cli.main(argv) == 0, argv
    (root / "ctrate").mkdir()
    (root / "reports.csv").write_text("VolumeName,Findings_EN,Impressions_EN\n")
    (root / "report.txt").write_text("Findings: Right pleural effusion.\n\nImpressions: Effusion.\n")
    (root / "normal.txt").write_text("Findings: No pleural effusion.\n\nImpressions: Normal chest CT.\n")
    return root


def truncated(path: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        data = (root / path).read_bytes()
        (root / path).write_bytes(data[: len(data) // 2])

    return damage


def pickled(path: str) -> Callable[[Path], None]:
    """A torch.save pickle in place of a safetensors checkpoint: it must be refused, never unpickled."""
    return lambda root: torch.save({"step": torch.tensor(1)}, root / path)


class Case(NamedTuple):
    name: str
    argv: list[str]  # {root} expands to the folder holding data/, vae/, flow/ ...
    code: int
    message: str
    absent: tuple[str, ...] = ()  # paths (under root) the refused command must not have created
    damage: Callable[[Path], None] | None = None


NEW = "new"  # an output path that does not exist yet
EXPORT = ["export", "--flow", "{root}/flow", "--vae", "{root}/vae", "--cache", "{root}/latents", "--out",
          f"{{root}}/{NEW}"]
EVALUATE_KEYS = [field.name for field in dataclasses.fields(ModelEvaluation)]


def encoded_again(root: Path, holdout: int) -> None:
    """latents/ removed and made again from the data, of other patients (one more held out)."""
    shutil.rmtree(root / "latents")
    assert cli.main(["cache-latents", "--data", str(root / "data"), "--vae", str(root / "vae" / "vae"), "--out",
                     str(root / "latents"), "--holdout", str(holdout), "--size", str(SIZE)]) == 0


def shift_start(store: Path) -> None:
    """The start latent moved, as another autoencoder would encode the start slice."""
    common = load_file(store / "common.safetensors")
    save_file({**common, "start": common["start"] + 1}, store / "common.safetensors")

CASES = [
    # --- item 3: a finished run or a prepared folder is never replaced unasked
    Case("vae over a finished run", ["vae", "--data", "{root}/data", "--out", "{root}/vae", *VAE], 1, "--overwrite"),
    Case("evaluate over an earlier result", ["evaluate", "--model", "{root}/vae", "--data", "{root}/data", "--out",
                                             "{root}/result.json"], 1, "--overwrite",
         damage=lambda root: (root / "result.json").write_text("{}\n")),
    Case("cohort-preview over an earlier image", ["cohort-preview", "--cohort", "{root}/data", "--out",
                                                  "{root}/preview.png"], 1, "--overwrite",
         damage=lambda root: (root / "preview.png").write_bytes(b"an image the user keeps")),
    Case("flow over a finished run", ["flow", "--cache", "{root}/latents", "--out", "{root}/flow", *FLOW],
         1, "--overwrite"),
    Case("prepare-ctrate over a prepared folder", ["prepare-ctrate", "--root", "{root}/ctrate", "--reports",
                                                   "{root}/reports.csv", "--out", "{root}/data"], 1, "--overwrite"),
    Case("cohort over a prepared folder", ["cohort", "--out", "{root}/data", "--patients", "1"], 1, "--overwrite"),
    Case("resume and overwrite together", ["vae", "--data", "{root}/data", "--out", "{root}/vae", "--resume",
                                           "--overwrite", *VAE], 2, "not allowed with"),
    # --- item 8: missing or damaged inputs
    Case("vae on a missing data folder", ["vae", "--data", "{root}/missing", "--out", f"{{root}}/{NEW}", *VAE],
         1, "missing", absent=(NEW,)),
    Case("vae on a folder that is not prepared data", ["vae", "--data", "{root}/ctrate", "--out", f"{{root}}/{NEW}",
                                                       *VAE], 1, INDEX, absent=(NEW,)),
    Case("vae holding out every patient", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                           "--holdout", "3"], 1, "holdout", absent=(NEW,)),
    Case("vae holding out no patient", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                        "--holdout", "0"], 1, "--holdout must be at least 1", absent=(NEW,)),
    Case("vae weighting the findings of data without masks", ["vae", "--data", "{root}/data", "--out",
                                                              f"{{root}}/{NEW}", *VAE, "--finding-weight", "4"],
         1, "need the finding masks", absent=(NEW,)),
    Case("vae with a finding weight that is no number", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}",
                                                         *VAE, "--finding-weight", "inf"], 2,
         "must be a finite number >= 0", absent=(NEW,)),
    Case("vae decoder of a missing run", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                          "--decoder-of", "{root}/missing"], 1, "missing", absent=(NEW,)),
    Case("vae anchored to a missing run", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                           "--anchor-to", "{root}/missing"], 1, "missing", absent=(NEW,)),
    Case("vae with an anchor weight but no anchor", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                                     "--anchor-weight", "2"], 1, "--anchor-to RUN", absent=(NEW,)),
    Case("vae both decoder-only and anchored", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                                "--decoder-of", "{root}/vae", "--anchor-to", "{root}/vae"], 2,
         "not allowed with", absent=(NEW,)),
    Case("vae resuming a truncated checkpoint", ["vae", "--data", "{root}/data", "--out", "{root}/vae", "--resume",
                                                 *VAE], 1, "checkpoint.safetensors",
         damage=truncated("vae/checkpoint.safetensors")),
    Case("vae resuming a pickled checkpoint", ["vae", "--data", "{root}/data", "--out", "{root}/vae", "--resume", *VAE],
         1, "checkpoint.safetensors", damage=pickled("vae/checkpoint.safetensors")),
    Case("flow on a missing cache", ["flow", "--cache", "{root}/missing", "--out", f"{{root}}/{NEW}",
                                     *FLOW], 1, "missing", absent=(NEW,)),
    Case("flow on a pickled cache", ["flow", "--cache", "{root}/pickle.safetensors", "--out", f"{{root}}/{NEW}", *FLOW],
         1, "pickle.safetensors", absent=(NEW,), damage=pickled("pickle.safetensors")),
    Case("flow starting from a missing run", ["flow", "--cache", "{root}/latents", "--out",
                                              f"{{root}}/{NEW}", *FLOW, "--init", "{root}/missing"],
         1, "missing", absent=(NEW,)),
    Case("flow resuming a truncated checkpoint", ["flow", "--cache", "{root}/latents", "--out",
                                                  "{root}/flow", "--resume", *FLOW], 1, "checkpoint.safetensors",
         damage=truncated("flow/checkpoint.safetensors")),
    Case("flow resuming a pickled checkpoint", ["flow", "--cache", "{root}/latents", "--out",
                                                "{root}/flow", "--resume", *FLOW], 1, "checkpoint.safetensors",
         damage=pickled("flow/checkpoint.safetensors")),
    Case("flow resuming with another learning rate and batch", ["flow", "--cache", "{root}/latents", "--out",
                                                                "{root}/flow", "--resume", *FLOW, "--lr", "0.001",
                                                                "--batch", "4"], 1,
         "started with --batch 2 (now 4), --lr 0.0002 (now 0.001): resume"),
    Case("flow resuming on more stores", ["flow", "--cache", "{root}/latents", "{root}/latents", "--out", "{root}/flow",
                                          "--resume", *FLOW], 1, "latents (now {root}/latents {root}/latents)"),
    Case("vae resuming anchored to a run it was not", ["vae", "--data", "{root}/data", "--out", "{root}/vae",
                                                       "--resume", *VAE, "--anchor-to", "{root}/vae"], 1,
         "--anchor-to not given (now {root}/vae)"),
    Case("vae resuming with another KL weight", ["vae", "--data", "{root}/data", "--out", "{root}/vae", "--resume", *VAE,
                                              "--kl-weight", "0.5"], 1, "--kl-weight"),
    # --- absurd numbers: refused by the parser, before anything is read or written
    Case("flow with a share that is no number", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}",
                                                 *FLOW, "--start-p", "nan"], 2, "must be a share from 0 to 1",
         absent=(NEW,)),
    Case("flow with a share above one", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}", *FLOW,
                                         "--text-drop", "1.5"], 2, "must be a share from 0 to 1", absent=(NEW,)),
    Case("flow boosting findings without twins", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}",
                                                  *FLOW, "--finding-p", "0.5"], 1, "--finding-p needs --paired-twins",
         absent=(NEW,)),
    Case("flow with a seam weight that is no number", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}",
                                                       *FLOW, "--seam-weight", "nan"], 2,
         "must be a finite number >= 0", absent=(NEW,)),
    Case("flow with no steps", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}", *FLOW, "--steps", "0"],
         2, "must be a whole number above zero", absent=(NEW,)),
    Case("vae logging every zeroth step", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                           "--log-every", "0"], 2, "must be a whole number above zero", absent=(NEW,)),
    Case("flow with a learning rate that is no number", ["flow", "--cache", "{root}/latents", "--out",
                                                         f"{{root}}/{NEW}", *FLOW, "--lr", "nan"], 2,
         "must be a finite number above zero", absent=(NEW,)),
    Case("flow with a negative warm-up", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}", *FLOW,
                                          "--warmup", "-5"], 2, "must be a whole number >= 0", absent=(NEW,)),
    Case("flow on report variants a store does not hold", ["flow", "--cache", "{root}/latents", "--out",
                                                           f"{{root}}/{NEW}", *FLOW, "--variant-p", "0.5"], 1,
         "--variant-p needs a latent store with report variants", absent=(NEW,)),
    Case("cache-latents with fewer than no variants", ["cache-latents", "--data", "{root}/data", "--vae",
                                                       "{root}/vae/vae", "--out", f"{{root}}/{NEW}/store",
                                                       "--variants", "-2"], 2, "must be a whole number >= 0",
         absent=(NEW,)),
    Case("cohort at an infinite slice spacing", ["cohort", "--out", f"{{root}}/{NEW}", "--patients", "1",
                                                 "--slice-spacing", "inf"], 2, "must be a finite number from 0.1 to 20",
         absent=(NEW,)),
    # --- from a review of the training commands: numbers that trained nothing, NaN models, tracebacks
    Case("flow with an EMA decay that is no number", ["flow", "--cache", "{root}/latents", "--out",
                                                      f"{{root}}/{NEW}", *FLOW, "--ema", "nan"], 2,
         "must be a share from 0 to 1", absent=(NEW,)),
    Case("flow accumulating no batches", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}", *FLOW,
                                          "--accumulate", "0"], 2, "must be a whole number above zero", absent=(NEW,)),
    Case("flow with no rollout steps", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}", *FLOW,
                                        "--rollout-p", "0.5", "--rollout-steps", "0"], 2,
         "must be a whole number above zero", absent=(NEW,)),
    Case("flow with no hidden size", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}", *FLOW,
                                      "--hidden", "0"], 2, "must be a whole number above zero", absent=(NEW,)),
    Case("flow with a patch of no slices", ["flow", "--cache", "{root}/latents", "--out", f"{{root}}/{NEW}", *FLOW,
                                            "--patch", "0", "2", "2"], 2, "must be a whole number above zero",
         absent=(NEW,)),
    Case("flow with a time shift that is no number", ["flow", "--cache", "{root}/latents", "--out",
                                                      f"{{root}}/{NEW}", *FLOW, "--time-shift", "nan"], 2,
         "must be a finite number above zero", absent=(NEW,)),
    Case("vae with a KL weight that is no number", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                                    "--kl-weight", "nan"], 2, "must be a finite number >= 0",
         absent=(NEW,)),
    Case("vae with negative threads", ["vae", "--data", "{root}/data", "--out", f"{{root}}/{NEW}", *VAE,
                                       "--threads", "-2"], 2, "must be a whole number >= 0", absent=(NEW,)),
    Case("vae overwriting a run with a crop larger than the slices", ["vae", "--data", "{root}/data", "--out",
                                                                      "{root}/vae", *VAE, "--crop", "999",
                                                                      "--overwrite"], 1,
         "--crop 999 is larger than the slices"),  # the finished run stays whole (the snapshot)
    Case("cohort with a seed of 400 digits", ["cohort", "--out", f"{{root}}/{NEW}", "--patients", "1", "--seed",
                                              "9" * 400], 2, "must be a whole number from 0 to", absent=(NEW,)),
    Case("cohort with a negative seed", ["cohort", "--out", f"{{root}}/{NEW}", "--patients", "1", "--seed", "-1"], 2,
         "must be a whole number from 0 to", absent=(NEW,)),
    Case("cache-latents at another size than the data's", ["cache-latents", "--data", "{root}/data", "--vae",
                                                          "{root}/vae/vae", "--out", f"{{root}}/{NEW}/store",
                                                          "--holdout", "1", "--size", "32"], 1,
         f"holds {SIZE}x{SIZE} slices, not --size 32", absent=(NEW,)),
    Case("cache-latents limited to fewer than no patients", ["cache-latents", "--data", "{root}/data", "--vae",
                                                             "{root}/vae/vae", "--out", f"{{root}}/{NEW}/store",
                                                             "--limit", "-1"], 2, "must be a whole number >= 0",
         absent=(NEW,)),
    Case("prepare-ctrate given the metadata CSV for the reports", ["prepare-ctrate", "--root", "{root}/ctrate",
                                                                  "--reports", "{root}/metadata.csv", "--out",
                                                                  f"{{root}}/{NEW}"], 1,
         "has no Findings_EN, Impressions_EN columns", absent=(NEW,),
         damage=lambda root: (root / "metadata.csv").write_text("VolumeName,XYSpacing\nv_1.nii.gz,0.7\n")),
    Case("evaluate holding out no patient", ["evaluate", "--model", "{root}/missing", "--data", "{root}/data",
                                             "--holdout", "0", "--out", f"{{root}}/{NEW}/e.json"], 1,
         "--holdout must be at least 1", absent=(NEW,)),
    Case("finding study of no seeds", ["finding-study", "--model", "{root}/missing", "--data", "{root}/data",
                                       "--latents", "{root}/latents", "--prior", "{root}/prior.npz", "--seeds", "0",
                                       "--out", f"{{root}}/{NEW}/f.json"], 2, "must be a whole number above zero",
         absent=(NEW,)),
    Case("cache-latents on a missing data folder", ["cache-latents", "--data", "{root}/missing", "--vae",
                                                    "{root}/vae/vae", "--out", f"{{root}}/{NEW}/store"],
         1, "missing", absent=(NEW,)),
    Case("cache-latents with a missing VAE", ["cache-latents", "--data", "{root}/data", "--vae", "{root}/missing",
                                              "--holdout", "1", "--out", f"{{root}}/{NEW}/store"], 1, "missing",
         absent=(NEW,)),
    Case("prepare-ctrate on a missing tree", ["prepare-ctrate", "--root", "{root}/missing", "--reports",
                                              "{root}/reports.csv", "--out", f"{{root}}/{NEW}"],
         1, "missing", absent=(NEW,)),
    Case("prepare-ctrate without its reports", ["prepare-ctrate", "--root", "{root}/ctrate", "--reports",
                                                "{root}/missing.csv", "--out", f"{{root}}/{NEW}"],
         1, "missing.csv", absent=(NEW,)),
    Case("cohort-preview of a missing cohort", ["cohort-preview", "--cohort", "{root}/missing", "--out",
                                                f"{{root}}/{NEW}/p.png"], 1, "missing", absent=(NEW,)),
    Case("export of a missing run", ["export", "--flow", "{root}/missing", "--vae", "{root}/vae", "--cache",
                                     "{root}/latents", "--out", f"{{root}}/{NEW}"], 1, "missing",
         absent=(NEW,)),
    Case("flow resumed on a store made again from other data", ["flow", "--cache", "{root}/latents", "--out",
                                                                "{root}/flow", *FLOW, "--steps", "4", "--resume"], 1,
         "was trained on other contents of", damage=lambda root: encoded_again(root, holdout=2)),
    Case("flow in blocks the data's end padding does not fit", ["flow", "--cache", "{root}/latents", "--out",
                                                                f"{{root}}/{NEW}", *FLOW, "--block", "32"], 1,
         "--block 32: the prepared volumes end in white slices padded for blocks of 16", absent=(NEW,)),
    Case("export with figures that are a list", [*EXPORT, "--evaluation", "{root}/figures.json"], 1,
         "figures.json is not a file of figures: a JSON list, not an object", absent=(NEW,),
         damage=lambda root: (root / "figures.json").write_text("[1, 2]")),
    Case("export with a damaged evaluate result", [*EXPORT, "--evaluation", "{root}/eval.json"], 1,
         "eval.json is not a file of figures", absent=(NEW,),
         damage=lambda root: (root / "eval.json").write_text(json.dumps(dict.fromkeys(EVALUATE_KEYS, 1)))),
    Case("export over an existing folder", [*EXPORT[:-1], "{root}/data"], 1, "already exists"),
    Case("export with a store of another autoencoder", EXPORT, 1,
         "was not encoded by the autoencoder of --vae", absent=(NEW,), damage=lambda root: shift_start(root / "latents")),
    Case("export with a NaN side guidance", ["export", "--flow", "{root}/missing", "--vae", "{root}/vae", "--cache",
                                             "{root}/latents", "--out", f"{{root}}/{NEW}", "--side-guidance", "nan"],
         2, "it must be a finite number, not nan", absent=(NEW,)),
    Case("finding study of data without finding labels", ["finding-study", "--model", "{root}/missing", "--data",
                                                          "{root}/data", "--latents", "{root}/latents", "--prior",
                                                          "{root}/prior.npz", "--out", f"{{root}}/{NEW}/f.json"], 1,
         "has no finding labels for 2 volumes of", absent=(NEW,)),
    Case("finding study without its latents", ["finding-study", "--model", "{root}/missing", "--data", "{root}/data",
                                               "--latents", "{root}/missing.safetensors", "--prior",
                                               "{root}/prior.npz", "--out",
                                               f"{{root}}/{NEW}/f.json"], 1, "missing", absent=(NEW,)),
    Case("evaluate a missing model", ["evaluate", "--model", "{root}/missing", "--data", "{root}/data", "--out",
                                      f"{{root}}/{NEW}/e.json"], 1, "missing", absent=(NEW,)),
    Case("report-figure over an earlier image", [*FIGURE, "--model", "{root}/vae", "--out", "{root}/figure.png"], 1,
         "--overwrite", damage=lambda root: (root / "figure.png").write_bytes(b"an image the user keeps")),
    Case("report-figure of a missing model", [*FIGURE, "--model", "{root}/missing", "--out", f"{{root}}/{NEW}/f.png"],
         1, "missing", absent=(NEW,)),
    Case("report-figure of an empty report", [*FIGURE, "--model", "{root}/vae", "--out", f"{{root}}/{NEW}/f.png"], 1,
         "report.txt: the report is empty", absent=(NEW,), damage=lambda root: (root / "report.txt").write_text("\n")),
    Case("report-figure with a seed that is no number", [*FIGURE, "--model", "{root}/vae", "--seeds", "0", "one",
                                                         "--out", f"{{root}}/{NEW}/f.png"], 2, "must be a whole number from 0 to",
         absent=(NEW,)),
]


@pytest.fixture
def root(world, tmp_path):
    """A private copy of the world: a case may damage it."""
    return shutil.copytree(world, tmp_path / "world")


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_bad_training_input_gets_one_line(case, root, capsys):
    if case.damage:
        case.damage(root)
    before = snapshot(root)
    code, err = run_train([arg.replace("{root}", str(root)) for arg in case.argv], capsys)
    message = case.message.replace("{root}", str(root))
    assert (code, message in err) == (case.code, True), err
    lines = err.strip().splitlines()  # one line; argparse's usage errors print the usage first
    assert "Traceback" not in err and (len(lines) == 1 or code == 2) and message in lines[-1], err
    assert [path for path in case.absent if (root / path).exists()] == []
    assert snapshot(root) == before


# ------------------------------------------------------------------- what is asked for explicitly still works


def test_resume_of_a_finished_run_changes_no_weights(root, capsys):
    checkpoint = sha256_file(root / "vae" / "checkpoint.safetensors")
    assert run_train(["vae", "--data", f"{root}/data", "--out", f"{root}/vae", "--resume", *VAE], capsys)[0] == 0
    assert sha256_file(root / "vae" / "checkpoint.safetensors") == checkpoint
    checkpoint = sha256_file(root / "flow" / "checkpoint.safetensors")
    assert run_train(["flow", "--cache", f"{root}/latents", "--out", f"{root}/flow", "--resume", *FLOW],
                     capsys)[0] == 0
    assert sha256_file(root / "flow" / "checkpoint.safetensors") == checkpoint


def test_a_moved_run_may_resume_longer_on_other_threads_and_name_an_init(root, capsys):
    moved = shutil.copytree(root / "latents", root / "moved")  # the world itself was copied: the run moved too
    code, err = run_train(["flow", "--cache", str(moved), "--out", f"{root}/flow", "--resume", *FLOW, "--steps", "3",
                           "--threads", "2", "--save-every", "1", "--workers", "0", "--init", f"{root}/flow"], capsys)
    assert code == 0, err
    assert read_meta(root / "flow" / "checkpoint.safetensors")["step"] == 3


def test_a_requeued_job_killed_before_its_first_checkpoint_starts_the_run_and_may_change_accumulate(root, capsys):
    """A cluster job killed before its first save leaves only loss.csv: the same --resume command starts the run;
    a later resume may take another --accumulate (as it may another process count)."""
    out = root / "requeued"
    out.mkdir()
    (out / "loss.csv").write_text("step,lr,loss,step_s\n")
    code, err = run_train(["flow", "--cache", f"{root}/latents", "--out", str(out), "--resume", *FLOW], capsys)
    assert code == 0, err
    assert read_meta(out / "checkpoint.safetensors")["step"] == 2
    code, err = run_train(["flow", "--cache", f"{root}/latents", "--out", str(out), "--resume", *FLOW, "--steps", "3",
                           "--accumulate", "2"], capsys)
    assert code == 0, err
    assert read_meta(out / "checkpoint.safetensors")["step"] == 3
    shutil.rmtree(out)


def test_overwrite_replaces_a_run_and_leaves_nothing_of_the_old_one(root, capsys):
    assert read_meta(root / "flow" / "checkpoint.safetensors")["step"] == 2
    code, err = run_train(["flow", "--cache", f"{root}/latents", "--out", f"{root}/flow", *FLOW, "--overwrite",
                           "--steps", "1", "--save-every", "1"], capsys)
    assert code == 0, err
    assert read_meta(root / "flow" / "checkpoint.safetensors")["step"] == 1
    assert len((root / "flow" / "loss.csv").read_text().splitlines()) == 2  # header and the new run's one step


def test_prepare_ctrate_overwrite_replaces_the_index_and_its_cases(root, capsys):
    old = (root / "data" / INDEX).read_text()
    assert old and all((root / "data" / sub / "p0.nii.gz").exists() for sub in ("volumes", "masks"))
    code, err = run_train(["prepare-ctrate", "--root", f"{root}/ctrate", "--reports", f"{root}/reports.csv", "--out",
                           f"{root}/data", "--overwrite"], capsys)
    assert code == 0, err
    assert (root / "data" / INDEX).read_text() == ""  # the tree holds no volumes
    assert not any((root / "data" / sub / "p0.nii.gz").exists() for sub in ("volumes", "masks"))  # no orphans


def test_a_prepared_folder_of_no_cases_may_be_prepared_again(root, capsys):
    """An empty index (a run that wrote no case) holds nothing to lose: the rerun needs no --overwrite."""
    argv = ["prepare-ctrate", "--root", f"{root}/ctrate", "--reports", f"{root}/reports.csv", "--out", f"{root}/again"]
    assert run_train(argv, capsys)[0] == 0 and (root / "again" / INDEX).read_text() == ""
    code, err = run_train(argv, capsys)
    assert code == 0, err
