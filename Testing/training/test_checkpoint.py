"""Training checkpoints: atomic, shared like any output, and refused where they lack what a run needs."""

from __future__ import annotations

import pytest
import torch

import ctflow
from ctflow.io import plain_mode
from ctflow_train.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_checkpoint_refuses_missing_random_state(tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", {"m": torch.nn.Linear(2, 2)}, {}, {}, {"step": 1})
    assert path.stat().st_mode & 0o777 == plain_mode()  # not left private, as the temporary file was
    with pytest.raises(ctflow.CTFlowError, match="random state"):
        load_checkpoint(path, {}, {}, {"data": torch.Generator()})
