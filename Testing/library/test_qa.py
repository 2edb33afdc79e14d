"""`ctflow qa`: each measure on volumes whose seams, sharpness and HU are known by construction."""

import json

import numpy as np
import pytest
from PIL import Image

from ctflow import Geometry, Provenance, Volume, write_volume
from ctflow.cli import main
from ctflow.errors import OutputExistsError
from ctflow.qa import (
    NOMINAL_HU, assess, compare_hu, detail_over_depth, diversity, hu_statistics, load_reference, lungs_end,
    run_qa, seam_continuity, thumbnail,
)


def provenance(report="Findings: Normal.", seed=0, block_slices=8, slices_requested=None):
    return Provenance(report=report, prompt=report, seed=seed, steps=2, sampler="heun", shift=1.0, guidance=1.0,
                      model="test", model_sha256="0" * 64, ctflow_version="0", slices_requested=slices_requested,
                      block_slices=block_slices)


def seamed(blocks=3, block=8, jump=100.0, size=16):
    """Slices rising 2 HU a slice inside each block, plus `jump` HU at every block start."""
    k = np.arange(blocks * block)
    level = 2.0 * k + jump * (k // block)
    return np.broadcast_to(level[:, None, None], (len(k), size, size)).astype(np.int16)


def test_seams_stand_out_against_the_steps_inside_blocks():
    result = seam_continuity(seamed(jump=100.0), block_slices=8)
    assert result["seams"] == 2 and result["inside_hu"] == pytest.approx(2.0)
    assert result["across_hu"] == pytest.approx(102.0) and result["ratio"] == pytest.approx(51.0)
    assert seam_continuity(seamed(jump=0.0), block_slices=8)["ratio"] == pytest.approx(1.0)
    assert seam_continuity(seamed(blocks=1), block_slices=8)["ratio"] is None  # no seam to judge


def test_fading_detail_shows_as_a_negative_trend():
    rng = np.random.default_rng(0)
    texture = rng.normal(0, 100, (8, 32, 32))
    hu = np.concatenate([texture * 0.5**b for b in range(4)]).astype(np.float32)  # detail halves each block
    result = detail_over_depth(hu, block_slices=8)
    assert result["percent_per_block"] == pytest.approx(-50.0, abs=1.0)
    assert result["last_over_first"] == pytest.approx(0.125, rel=0.02)
    steady = detail_over_depth(np.concatenate([texture] * 3), block_slices=8)
    assert steady["percent_per_block"] == pytest.approx(0.0, abs=1e-6)


def tissue_volume(offset=0.0):
    """20 slices: 8 air, 6 lung, 2 fat, 3 soft tissue, 1 bone, each at its textbook HU plus `offset`."""
    counts = {"air": 8, "lung": 6, "fat": 2, "soft tissue": 3, "bone": 1}
    values = np.concatenate([[NOMINAL_HU[name] + offset] * n for name, n in counts.items()])
    return np.broadcast_to(values[:, None, None], (20, 8, 8)).astype(np.int16), counts


def test_hu_statistics_of_known_tissues():
    hu, counts = tissue_volume()
    stats = hu_statistics(hu)
    for name, n in counts.items():
        assert stats["tissues"][name]["fraction"] == pytest.approx(n / 20)
        assert stats["tissues"][name]["mean_hu"] == pytest.approx(NOMINAL_HU[name])
    nominal = compare_hu(stats, None)
    assert nominal["against"] == "nominal HU" and all(v["mean_hu"] == 0 for v in nominal["tissues"].values())
    shifted = compare_hu(hu_statistics(tissue_volume(offset=20.0)[0]), stats)
    assert shifted["histogram_distance_hu"] == pytest.approx(20.0)
    assert shifted["tissues"]["fat"]["mean_hu"] == pytest.approx(20.0)
    assert compare_hu(stats, stats)["histogram_distance_hu"] == 0


def test_the_lungs_end_where_their_share_falls_below_half_its_peak():
    hu = np.full((90, 20, 20), 40, np.int16)  # soft tissue from head to feet
    hu[10:50, 4:16, 4:16] = -850  # lungs over slices 10-49: 36 % of each slice
    hu[50:80, 4:6, 4:6] = -700  # a recess of lung-density voxels low down: 1 %, not the lungs
    assert lungs_end(hu) == 50
    hu[30:50, 4:16, 12:16] = 40  # the lower lungs two thirds as wide: still lungs, the fade just reached sooner
    assert lungs_end(hu) == 49  # the running mean over slices 46-50 still holds 4/5 of 24 %, over half the peak
    hu[40:50, 4:16, 4:16] = 40  # the lowest ten slices without lung: ten slices sooner
    assert lungs_end(hu) == 39
    assert lungs_end(np.full((30, 8, 8), 40, np.int16)) is None  # no lungs at all


def test_assess_reads_block_size_and_requested_length_from_provenance():
    volume = Volume(seamed(), Geometry((1.0, 1.0, 2.5)), provenance(block_slices=8, slices_requested=20))
    result = assess(volume)
    assert result["block_slices"] == 8 and result["seams"]["ratio"] == pytest.approx(51.0)
    assert result["length"] == {"requested": 20, "produced": 24, "difference": 4}
    assert assess(volume, block_slices=12)["seams"]["seams"] == 1
    unknown = assess(Volume(seamed(), Geometry((1.0, 1.0, 2.5)), None))
    assert unknown["seams"]["reason"].startswith("block size unknown") and unknown["length"]["requested"] is None


def test_diversity_within_a_report_and_between_reports():
    rng = np.random.default_rng(1)
    a, b = (rng.normal(0, 100, (8, 16, 16)) for _ in range(2))
    groups = {"same twice": [thumbnail(a), thumbnail(a)], "two seeds": [thumbnail(a), thumbnail(a + 30)]}
    result = diversity(groups)
    assert [r["mean_distance_hu"] for r in result["per_report"]] == pytest.approx([0.0, 30.0])
    assert result["within_report_hu"] == pytest.approx(15.0) and result["between_reports_hu"] == pytest.approx(0.0)


def test_a_folder_gets_a_page_per_volume_and_a_summary(tmp_path, capsys):
    for seed in (0, 1):
        volume = Volume(seamed(jump=50.0 * seed, size=32), Geometry((1.0, 1.0, 2.5)), provenance(seed=seed))
        write_volume(volume, tmp_path / f"ct_s{seed}.nii.gz")
    reference = tmp_path / "qa" / "reference.nrrd"
    reference.parent.mkdir()
    write_volume(Volume(tissue_volume()[0], Geometry((1.0, 1.0, 2.5)), None), reference)
    document = run_qa([tmp_path / "ct_s0.nii.gz", tmp_path / "ct_s1.nii.gz"], tmp_path / "qa",
                      reference=load_reference(reference))
    assert document["summary"]["volumes"] == 2 and document["diversity"]["per_report"][0]["seeds"] == 2
    page = Image.open(tmp_path / "qa" / "ct_s1.qa.png")
    assert page.width == 768 and page.height > 600
    saved = json.loads((tmp_path / "qa" / "ct_s1.qa.json").read_text())
    assert saved["seams"]["ratio"] > 10 and saved["hu_difference"]["against"] == "reference"
    assert load_reference(tmp_path / "qa" / "qa.json") == document["reference"]  # a qa.json serves as a reference
    with pytest.raises(OutputExistsError):
        run_qa([tmp_path / "ct_s0.nii.gz"], tmp_path / "qa")
    assert main(["qa", str(tmp_path), "--block-slices", "4", "--out", str(tmp_path / "qa4")]) == 0
    assert json.loads(capsys.readouterr().out.split("\nwrote")[0])["summary"]["volumes"] == 2
    assert json.loads((tmp_path / "qa4" / "qa.json").read_text())["volumes"]["ct_s0"]["block_slices"] == 4


def test_a_set_of_odd_volumes_is_checked_whole(tmp_path):
    """One slice (a valid --slices 1), two slice sizes (volumes of two models), a header with a damaged
    provenance, a real CT: each gets its page, and the set its summary, instead of a traceback at the end."""
    write_volume(Volume(seamed(blocks=1, block=1), Geometry((1.0, 1.0, 2.5)), provenance()), tmp_path / "one.nrrd")
    write_volume(Volume(seamed(size=16), Geometry((1.0, 1.0, 2.5)), provenance(report="Findings: A.")),
                 tmp_path / "small.nrrd")
    write_volume(Volume(seamed(size=32), Geometry((1.0, 1.0, 2.5)), provenance(report="Findings: B.")),
                 tmp_path / "large.nrrd")
    write_volume(Volume(seamed(size=16, jump=40.0), Geometry((1.0, 1.0, 2.5)), provenance(report="Findings: D.")),
                 tmp_path / "small_too.nrrd")
    damaged = tmp_path / "damaged.nrrd"
    write_volume(Volume(seamed(), Geometry((1.0, 1.0, 2.5)), provenance(report="Findings: C.")), damaged)
    damaged.write_bytes(damaged.read_bytes().replace(b"CTFlow_seed:=0", b"CTFlow_seed:=zero"))
    write_volume(Volume(seamed(), Geometry((1.0, 1.0, 2.5)), None), tmp_path / "real.nrrd")
    files = sorted(tmp_path.glob("*.nrrd"))
    document = run_qa(files, tmp_path / "qa")
    assert document["summary"]["volumes"] == 6 and not document["failed"]
    assert document["diversity"]["between_reports_hu"] == pytest.approx(60.0)  # the one pair of one size
    assert json.loads((tmp_path / "qa" / "qa.json").read_text())["volumes"]["damaged"]["seed"] is None
    header = np.asarray(Image.open(tmp_path / "qa" / "real.qa.png"))[:14]
    marked = np.asarray(Image.open(tmp_path / "qa" / "small.qa.png"))[:14]
    assert (header > 128).sum() < (marked > 128).sum() / 2  # "8 slices" alone, not "SYNTHETIC CT ... - 24 slices"


def test_volumes_that_share_a_stem_keep_a_report_each(tmp_path):
    """ct.nrrd and ct.nii.gz in one folder: reports named by the stem alone would replace each other."""
    for k, suffix in enumerate((".nii.gz", ".nrrd", ".mha")):
        volume = Volume(seamed(jump=20.0 * k), Geometry((1.0, 1.0, 2.5)), provenance(seed=k))
        write_volume(volume, tmp_path / f"ct{suffix}")
    write_volume(Volume(seamed(), Geometry((1.0, 1.0, 2.5)), provenance()), tmp_path / "other.nii.gz")
    assert main(["qa", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "qa" / "qa.json").read_text())
    assert sorted(document["volumes"]) == ["ct.mha", "ct.nii.gz", "ct.nrrd", "other"]
    assert (tmp_path / "qa" / "ct.nrrd.qa.png").is_file() and (tmp_path / "qa" / "other.qa.json").is_file()


def test_a_ct_stored_feet_first_is_checked_head_first(tmp_path):
    """qa reads slice 0 as the first made (detail fading block after block); a file stored feet first (RAS, as
    dcm2niix writes) gives the same figures, not a trend reversed."""
    import nibabel as nib

    texture = np.random.default_rng(0).normal(0, 100, (8, 32, 32))
    hu = np.concatenate([texture * 0.5**b for b in range(4)]).astype(np.int16)  # detail halves each block
    write_volume(Volume(hu, Geometry((1.0, 1.0, 2.5)), None), tmp_path / "head_first.nii.gz")
    nib.save(nib.as_closest_canonical(nib.load(tmp_path / "head_first.nii.gz")), tmp_path / "feet_first.nii.gz")
    assert main(["qa", str(tmp_path), "--block-slices", "8"]) == 0
    results = json.loads((tmp_path / "qa" / "qa.json").read_text())["volumes"]
    assert results["head_first"]["detail"]["percent_per_block"] < -40
    assert results["feet_first"] == results["head_first"]
