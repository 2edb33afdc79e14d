"""The bundled demo model: intact, small, labelled synthetic, and it turns a sample report into chest-like HU on CPU.

How good its anatomy is, and how fast, is measured by `ctflow-train evaluate`, `ctflow-train finding-study` and
`bench/generation.py` (figures in docs/training-log.md and the model card); this test catches a missing, damaged or
wrongly exported bundle, and a model that no longer makes a body with lungs in it.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ctflow
from ctflow.hub import default_model
from ctflow.model_folder import verify_model_folder

ROOT = Path(__file__).parents[2]
REPORT = ROOT / "Resources" / "SampleReports" / "normal_chest.txt"
# Mean HU of each 16x16-voxel tile of each slice, [16, 16, 16], of the sample report at slices=16, steps=4, seed 0,
# guidance 1 on the CPU (flow16_variants, recorded 2026-11-30 on an AVX2 CPU at 2 threads). The voxels themselves are not
# portable: CPU kernels and thread counts round differently (1 HU at most, a tile 0.25 HU), while a change to
# sampling, the end rule, decoding or weight loading moves some tile by hundreds of HU (5 steps for 4: 496, Euler for
# AB2: 275).
REFERENCE_TILES = Path(__file__).parents[1] / "data" / "bundled_model_tiles.npy"
TILE_TOLERANCE_HU = 2.0
MAX_BYTES = 40_000_000  # the issue allows tens of MB; the repository carries every version of it


def test_bundle_is_intact_small_and_says_what_it_is():
    folder = default_model()
    assert verify_model_folder(folder)  # raises CorruptModelError on a changed or missing file
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < MAX_BYTES
    card = (folder / "README.md").read_text().lower()
    assert "synthetic" in card and "not for clinical use" in card and "psnr" in card
    assert "conditioned on slice position, with a pooled-text vector" in card  # the conditioning it was trained with


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_bundle_passes_its_checksums_in_a_windows_checkout(tmp_path):
    """Git for Windows writes text files with CRLF endings (core.autocrlf=true): .gitattributes keeps the bundle's
    card and configs byte for byte, or every Windows user's default model would fail its checksums."""
    clone = tmp_path / "clone"
    git = ["git", "-c", "core.autocrlf=true", "-C", str(clone)]
    subprocess.run(["git", "clone", "-q", "--no-checkout", "--shared", str(ROOT), str(clone)], check=True)
    subprocess.run([*git, "checkout", "-q", "HEAD", "--", ".gitattributes"], check=True)  # read by the next one
    subprocess.run([*git, "checkout", "-q", "HEAD", "--", "Resources"], check=True)
    assert b"\r\n" in (clone / REPORT.relative_to(ROOT)).read_bytes()  # the conversion happened where allowed
    assert verify_model_folder(clone / default_model().relative_to(ROOT))


@pytest.fixture(scope="module")
def two_blocks():
    pipe = ctflow.CTFlowPipeline.from_pretrained(device="cpu")
    return pipe.generate(ctflow.GenerationRequest(REPORT.read_text(), slices=32, seed=0, steps=8))


def test_sample_report_gives_a_body_with_lungs_at_chest_hu(two_blocks):
    hu = two_blocks.hu.astype(np.float32)
    assert hu.shape == (32, 256, 256)
    corners = np.concatenate([hu[:, :24, :24].ravel(), hu[:, :24, -24:].ravel()])
    assert np.median(corners) < -900  # air around the patient
    middle = hu[16:, 64:192, 48:208]  # second block, the chest's inner box
    lung = ((middle > -950) & (middle < -600)).mean()
    soft = ((middle > -150) & (middle < 150)).mean()
    assert lung > 0.1 and soft > 0.1, f"lung {lung:.2f}, soft tissue {soft:.2f} of the chest's inner box"
    assert two_blocks.provenance.model == "ctflow-demo" and "synthetic" in two_blocks.provenance.synthetic.lower()


def fixed_seed_tiles() -> np.ndarray:
    """The reference's volume, as 16x16-tile mean HU [16, 16, 16]."""
    pipe = ctflow.CTFlowPipeline.from_pretrained(device="cpu")
    volume = pipe.generate(ctflow.GenerationRequest(REPORT.read_text(), slices=16, seed=0, steps=4, guidance=1.0))
    assert volume.hu.shape == (16, 256, 256)
    return volume.hu.astype(np.float64).reshape(16, 16, 16, 16, 16).mean(axis=(2, 4))


def test_fixed_seed_output_matches_the_recorded_reference():
    worst = np.abs(fixed_seed_tiles() - np.load(REFERENCE_TILES, allow_pickle=False)).max()
    assert worst <= TILE_TOLERANCE_HU, f"a tile's mean HU moved by {worst:.1f} from the recorded reference"


if __name__ == "__main__":  # a new bundle: record its reference (docs/training.md)
    np.save(REFERENCE_TILES, fixed_seed_tiles().astype(np.float32))
