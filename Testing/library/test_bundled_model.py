"""The bundled demo model: intact, small, labelled synthetic, and it turns a sample report into chest-like HU on CPU.

How good its anatomy is, and how fast, is measured by `ctflow-train evaluate`, `ctflow-train finding-study` and
`bench/generation.py` (figures in docs/training-log.md and the model card); this test catches a missing, damaged or
wrongly exported bundle, and a model that no longer makes a body with lungs in it.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest

import ctflow
from ctflow.hub import default_model
from ctflow.model_folder import verify_model_folder

REPORT = Path(__file__).parents[2] / "Resources" / "SampleReports" / "normal_chest.txt"
# sha256 of the int16 HU (little-endian) of the sample report at slices=16, steps=4, seed 0, guidance 1 on the CPU,
# recorded when these weights were bundled (flow16_wide, 2026-11-29): any change to sampling, the end rule, decoding
# or weight loading changes it.
FINGERPRINT = "bc3afb6d7a4f09bed4b608c65399113001b83830288997583ec01c12eb795162"
MAX_BYTES = 40_000_000  # the issue allows tens of MB; the repository carries every version of it


def test_bundle_is_intact_small_and_says_what_it_is():
    folder = default_model()
    assert verify_model_folder(folder)  # raises CorruptModelError on a changed or missing file
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < MAX_BYTES
    card = (folder / "README.md").read_text().lower()
    assert "synthetic" in card and "not for clinical use" in card and "psnr" in card
    assert "conditioned on slice position, with a pooled-text vector" in card  # the conditioning it was trained with


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


def test_fixed_seed_output_is_bit_identical_to_the_recorded_fingerprint():
    pipe = ctflow.CTFlowPipeline.from_pretrained(device="cpu")
    volume = pipe.generate(ctflow.GenerationRequest(REPORT.read_text(), slices=16, seed=0, steps=4, guidance=1.0))
    assert volume.hu.shape == (16, 256, 256)
    assert hashlib.sha256(np.ascontiguousarray(volume.hu, dtype="<i2").tobytes()).hexdigest() == FINGERPRINT
