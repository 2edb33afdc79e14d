"""Model evaluation: seam continuity, and typed results that survive their JSON and give the model card's lines."""

from __future__ import annotations

import numpy as np
import pytest

from ctflow_train import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_seam_jump_separates_block_boundaries_from_block_insides():
    hu = np.zeros((20, 4, 4), np.int16)
    hu[8:] += 100  # a 100 HU step between slices 7 and 8: a block boundary for blocks of 4
    hu[16:] = 1000  # white end slices: not part of the volume
    assert evaluate.real_slices(hu) == 16
    assert evaluate.seam_jump(hu, 4) == {"boundary_hu": pytest.approx(100 / 3), "inside_hu": 0.0}
