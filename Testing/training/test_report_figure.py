"""report-figure: where a report changed its volume against the normal one, the picture of it, and the command on a
tiny random model with real report files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctflow.conventions import END_HU
from ctflow_train import cli
from ctflow_train import report_figure as rf

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

SAMPLES = Path(__file__).parents[2] / "Resources" / "SampleReports"
SPACING = (1.5, 1.5, 2.5)  # i, j, k in mm


def chest(slices: int = 40, size: int = 48) -> np.ndarray:
    """int16 [slices + 4 white end slices, size, size]: soft tissue with two dark lungs."""
    hu = np.full((slices + 4, size, size), 40, np.int16)
    hu[:slices, 10:38, 6:22] = hu[:slices, 10:38, 26:42] = -850
    hu[slices:] = END_HU
    return hu


def test_the_place_of_largest_change_is_the_blob_not_a_lone_voxel_or_a_faint_shift():
    normal = chest()
    asked = normal.copy()
    asked[25:30, 28:34, 30:36] = 30  # a consolidation in the left lower lung: +880 HU over 5 x 6 x 6 voxels
    asked[5, 12, 8] = 1000  # one voxel the sampler drew differently, stronger than the blob
    asked[:40] += 30  # and the whole volume a little brighter
    k, j, i = rf.changed_centre(rf.change(asked, normal), SPACING)
    assert 25 <= k < 30 and 28 <= j < 34 and 30 <= i < 36
    axial, coronal = rf.views(asked, normal, SPACING)
    assert axial.name == f"axial k={k}" and coronal.name == f"coronal j={j}" and axial.peak == 910  # -850 to 60
    assert axial.changed.sum() == 36 + (k == 5) and axial.changed[28:34, 30:36].all()  # only the blob is outlined
    assert coronal.hu.shape == (40, 48) and coronal.aspect == pytest.approx(2.5 / 1.5)


def test_the_place_searched_is_the_chest_not_the_abdomen_below_the_lungs():
    normal = chest()
    normal[30:40, 10:38, 6:22] = normal[30:40, 10:38, 26:42] = 40  # slices 30-39: below the lungs
    asked = normal.copy()
    asked[33:37, 20:28, 20:28] = 900  # the abdomen moved more than the finding
    asked[15:19, 14:18, 8:12] = 40  # a nodule in the right lung: +890 HU over 4 x 4 x 4 voxels
    box = rf.chest(normal, SPACING)
    assert box.shape == (40, 48, 48) and box[:30].all() and not box[30:].any()  # lungs span the slice, plus margin
    assert rf.changed_centre(rf.change(asked, normal), SPACING)[0] >= 33  # anywhere: the abdomen
    axial, _ = rf.views(asked, normal, SPACING)
    k = int(axial.name.split("=")[1])
    assert 15 <= k < 19 and axial.changed[14:18, 8:12].all()


def test_the_chest_is_the_box_around_the_lungs_and_nothing_without_lungs():
    normal = np.full((20, 96, 96), -1000, np.int16)  # air around a body
    normal[:, 10:86, 10:86] = 40
    normal[:, 30:60, 20:40] = -850
    box = rf.chest(normal, SPACING)
    rows, columns = np.nonzero(box[5])
    assert (rows.min(), rows.max(), columns.min(), columns.max()) == (20, 69, 10, 49)  # grown by 15 mm: 10 voxels
    assert not rf.chest(np.full((20, 96, 96), 40, np.int16), SPACING).any()
    asked = np.full((20, 96, 96), 40, np.int16)
    asked[8:12, 40:50, 40:50] = 400
    axial, _ = rf.views(asked, np.full((20, 96, 96), 40, np.int16), SPACING)  # no lungs: the change anywhere
    assert axial.name in {f"axial k={k}" for k in range(8, 12)}


def test_the_change_covers_the_slices_both_volumes_have():
    longer, shorter = chest(40), chest(32)
    shorter[:32] += 100
    difference = rf.change(longer, shorter)
    assert difference.shape == (32, 48, 48) and np.all(difference == 100)  # never real slices against white ones


def test_a_caption_says_the_impressions_or_else_the_findings(tmp_path):
    (tmp_path / "a.txt").write_text("Findings: Small right pleural effusion.\n\nImpressions: Effusion.")
    (tmp_path / "b.txt").write_text("Small right pleural effusion.")
    assert rf.read_sample_report(tmp_path / "a.txt").summary == "Impressions: Effusion."
    assert rf.read_sample_report(tmp_path / "b.txt").summary == "Findings: Small right pleural effusion."


def test_a_tile_outlines_the_change_in_red():
    normal = chest()
    asked = normal.copy()
    asked[20:24, 14:24, 10:20] = 20
    axial, coronal = rf.views(asked, normal, SPACING)
    for view in (axial, coronal):
        pixels = np.asarray(rf.tile_image(view, "lung", 96))
        red = np.all(pixels == (255, 0, 0), axis=-1)
        columns = np.nonzero(red)[1] * 48 / red.shape[1]  # in the volume's columns
        assert red.any() and columns.min() >= 9 and columns.max() <= 21
    unchanged = rf.views(normal, normal, SPACING)[0]
    assert not np.all(np.asarray(rf.tile_image(unchanged, "lung", 96)) == (255, 0, 0), axis=-1).any()


@pytest.fixture
def reports(tmp_path) -> list[Path]:
    """Two sample reports with findings and the normal one, copied from Resources/SampleReports."""
    folder = tmp_path / "reports"
    folder.mkdir()
    names = ("RUL_nodule.txt", "right_pleural_effusion.txt", "normal_chest.txt")
    for name in names:
        (folder / name).write_text((SAMPLES / name).read_text())
    return [folder / name for name in names]


def test_report_figure_draws_a_row_per_report_and_two_views_per_seed(tiny_model, reports, tmp_path, capsys):
    out = tmp_path / "images" / "sample_reports.png"
    argv = ["report-figure", "--model", str(tiny_model), "--reports", *map(str, reports), "--normal", str(reports[2]),
            "--seeds", "3", "4", "--slices", "6", "--steps", "1", "--tile", "64", "--threads", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    progress = [line for line in captured.err.splitlines() if line.startswith("volume ")]
    assert len(progress) == 6 and all("ETA" in line for line in progress)  # 2 reports x 2 seeds + the normal once a seed
    assert all(re.search(r", lungs \d+ ml, in ", line) for line in progress)  # each volume's lungs, to look at
    assert sum("normal_chest.txt" in line for line in progress) == 2
    width, height = Image.open(out).size
    assert width == 2 * 2 * 64  # per seed an axial and a coronal view
    one_report = [*argv, "--reports", str(reports[0]), "--overwrite"]  # the later --reports wins
    assert cli.main(one_report) == 0 and capsys.readouterr().err.count("ETA") == 4
    assert Image.open(out).size == (width, height - rf.row_height(64))  # a row a report
    before = out.read_bytes()
    assert cli.main(argv) == 1  # an existing picture is not replaced unasked
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before


def test_report_figure_refuses_bad_reports_before_loading_the_model(reports, tmp_path, capsys):
    """(An empty report, a missing model, an existing picture: test_bad_training_inputs' table.)"""
    base = ["report-figure", "--model", str(tmp_path), "--normal", str(reports[2]), "--out", str(tmp_path / "f.png")]
    for given, message in (([str(tmp_path / "missing.txt")], "missing.txt does not exist"),
                           ([str(reports[2])], "at least one report besides the --normal one")):
        assert cli.main([*base, "--reports", *given]) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "f.png").exists()
