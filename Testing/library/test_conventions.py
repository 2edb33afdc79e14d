"""The conventions training and generation share agree with each other and with the configs built on them."""

import numpy as np
import torch

from ctflow.config import ModelConfig
from ctflow.conventions import (
    BLOCK_SLICES, END_HU, START_HU, WINDOWS, DisplayWindow, append_end_slices, end_slice_count, real_slices,
)


def body(slices: int, hu: float = 40.0) -> np.ndarray:
    """Slices of air with a square of tissue in the middle, as a real slice has air around the body."""
    volume = np.full((slices, 8, 8), START_HU, np.int16)
    volume[:, 2:6, 2:6] = hu
    return volume


def test_a_padded_training_volume_ends_where_its_real_slices_end():
    for slices in (1, 15, 16, 17, 40):
        padded = append_end_slices(body(slices))
        assert len(padded) % BLOCK_SLICES == 0 and len(padded) - slices == end_slice_count(slices) >= BLOCK_SLICES
        assert np.all(padded[-BLOCK_SLICES:] == END_HU)  # a whole white block: the sampler's stop signal
        assert real_slices(padded) == slices


def test_only_a_nearly_white_slice_ends_a_volume():
    assert real_slices(body(4, hu=3000)) == 4  # dense metal in the body: the air around it keeps the mean low
    decoded_end = np.full((1, 8, 8), 950, np.int16)  # a decoder draws the end slice near, not at, +1000 HU
    assert real_slices(np.concatenate([body(3), decoded_end, body(2)])) == 3  # the first end slice counts


def test_the_tokens_lie_at_the_ends_of_the_model_window_the_configs_default_to(tiny_pipeline):
    """The start and end tokens are the darkest and brightest pixels a default model's autoencoder takes."""
    autoencoder = tiny_pipeline.autoencoder
    assert autoencoder.config.hu_window == ModelConfig().autoencoder.hu_window
    bottom, top = autoencoder.config.pixel_range
    pixels = autoencoder.hu_to_model(torch.tensor([START_HU - 500, START_HU, END_HU, END_HU + 500])).tolist()
    assert pixels == [bottom, bottom, top, top]  # nothing darker than the start token, nor brighter than the end


def test_display_windows_are_level_then_width():
    assert WINDOWS["lung"] == DisplayWindow(level=-600.0, width=1500.0) and WINDOWS["lung"].low == -1350.0
    assert all(window.width > 0 for window in WINDOWS.values())
