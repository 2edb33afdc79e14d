"""lobe-prior: the anatomy prior's lobes in the model's latent grid, written beside a model's files so that its
pipeline reads them; the weights untouched; bad input refused before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ctflow
from ctflow.errors import CTFlowError
from ctflow.model_folder import WEIGHTS, verify_model_folder
from ctflow.places import HALF_LOBES, LOBE_FILE
from ctflow_train import finding_study as fs
from ctflow_train.cli import main
from ctflow_train.lobe_prior import lobe_shares

LOBES = [name for half in HALF_LOBES.values() for name in half]
NAMES = {"lung_upper_lobe_right": 1, "lung_middle_lobe_right": 2, "lung_lower_lobe_right": 3,
         "lung_upper_lobe_left": 4, "lung_lower_lobe_left": 5, "heart": 6, "aorta": 7, "trachea": 8, "esophagus": 9}


def label_maps(size: int) -> list[np.ndarray]:
    """Two patients of 16 slices: the right lower lobe in the back rows of the right half, lower half of the body;
    the second patient's a row further back."""
    maps = []
    for shift in (0, 1):
        labels = np.zeros((16, size, size), np.uint8)
        labels[8:, size // 2 + shift:, : size // 2] = NAMES["lung_lower_lobe_right"]
        labels[:8, : size // 2, size // 2:] = NAMES["lung_upper_lobe_left"]
        maps.append(labels)
    return maps


def test_the_lobes_are_averaged_over_each_latent_cell():
    prior = fs.AnatomyPrior.from_label_maps(label_maps(32), NAMES)  # 16 x 16 a slice (pooled by 2)
    shares = lobe_shares(prior, 8)  # cells of 2 x 2
    assert set(shares) == set(LOBES) and all(s.shape == (fs.LEVELS, 8, 8) for s in shares.values())
    lower = shares["right lower lobe"]
    assert torch.all(lower[: fs.LEVELS // 2] == 0) and torch.all(lower[fs.LEVELS // 2:, 4:, 4:] == 0)
    # the back rows: pixel rows 16 (the first patient) or 17 (the second) on: pooled row 8 holds 3/4, latent row 4
    # (pooled rows 8-9) 7/8, the rows behind it all
    assert torch.allclose(lower[-1, 4, :4], torch.full((4,), 0.875)) and torch.equal(lower[-1, 5:, :4], torch.ones(3, 4))
    assert torch.allclose(shares["left upper lobe"][0, :4, 4:], torch.ones(4, 4))
    with pytest.raises(CTFlowError, match="do not divide"):
        lobe_shares(prior, 5)


def test_a_model_copied_with_its_lobe_prior_reads_it(tiny_model, tmp_path, capsys):
    prior = fs.AnatomyPrior.from_label_maps(label_maps(16), NAMES)  # the tiny model's 16-pixel slices
    prior.save(tmp_path / "prior.npz")
    out = tmp_path / "lobes"
    argv = ["lobe-prior", "--model", str(tiny_model), "--prior", str(tmp_path / "prior.npz"), "--out", str(out)]
    assert main(argv) == 0
    written = json.loads(capsys.readouterr().out)
    assert written["model"] == str(out) and set(written["lobes"]) == set(LOBES)
    checksums = verify_model_folder(out)
    assert LOBE_FILE in checksums and checksums[WEIGHTS] == verify_model_folder(tiny_model)[WEIGHTS]
    pipe = ctflow.CTFlowPipeline.from_pretrained(out, device="cpu")
    assert torch.equal(pipe.lobe_prior.shares["right lower lobe"], lobe_shares(prior, 8)["right lower lobe"])
    assert "Lobe prior" in (out / "README.md").read_text()
    assert main(argv) == 1 and "exists" in capsys.readouterr().err  # never over a folder unasked
    again = ["lobe-prior", "--model", str(out), "--prior", str(tmp_path / "prior.npz"), "--out"]
    assert main([*again, str(out / "inner"), "--overwrite"]) == 1
    assert "one inside the other" in capsys.readouterr().err and not (out / "inner").exists()
    assert main([*argv, "--prior", str(tmp_path / "absent.npz"), "--out", str(tmp_path / "x")]) == 1
    assert "give the cohort" in capsys.readouterr().err and not (tmp_path / "x").exists()
    fs.AnatomyPrior.from_label_maps(label_maps(32), NAMES).save(tmp_path / "other.npz")  # another model's grid
    assert main([*argv, "--prior", str(tmp_path / "other.npz"), "--out", str(tmp_path / "y")]) == 1
    assert "made for slices of 32 pixels" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main([*again, str(out), "--overwrite"]) == 0  # the model folder itself, made again in place
    assert verify_model_folder(out) == checksums | {"README.md": verify_model_folder(out)["README.md"]}
