"""The rectified-flow ODE sampler."""

import math

import pytest
import torch

from ctflow.errors import RequestError
from ctflow.sampling import Cancelled, Guidance, guided, sample, time_grid


def test_time_grid_runs_from_noise_to_data_and_shift_favours_high_noise():
    plain, shifted = time_grid(10), time_grid(10, shift=3.0)
    assert plain[0] == shifted[0] == 1.0 and plain[-1] == shifted[-1] == 0.0
    assert (plain.diff() < 0).all() and (shifted.diff() < 0).all()
    assert (shifted[1:-1] > plain[1:-1]).all()


@pytest.mark.parametrize("method", ["euler", "heun", "ab2"])
def test_a_straight_flow_lands_exactly_on_its_target(method):
    target = torch.randn(2, 3)
    noise = torch.randn(2, 3)
    out = sample(lambda z, t: (z - target) / t, noise, steps=4, method=method, shift=2.0)
    assert torch.allclose(out, target, atol=1e-5)


def test_heun_is_more_accurate_than_euler_on_a_curved_flow():
    """dz/dt = z from t = 1 to 0: exact answer z(1) / e."""
    z1 = torch.ones(1)
    exact = z1 / math.e
    euler = sample(lambda z, t: z, z1, steps=10, method="euler")
    heun = sample(lambda z, t: z, z1, steps=10, method="heun")
    assert abs(heun - exact) < abs(euler - exact) / 5


def test_ab2_buys_second_order_accuracy_at_one_call_per_step():
    """dz/dt = z (1 + t) from t = 1 to 0, shifted grid: exact z(1) * exp(-1.5)."""
    calls = []

    def velocity(z, t):
        calls.append(1)
        return z * (1 + t)

    exact = math.exp(-1.5)
    ab2 = sample(velocity, torch.ones(1), steps=10, method="ab2", shift=2.0)
    assert len(calls) == 10
    euler = sample(velocity, torch.ones(1), steps=10, method="euler", shift=2.0)
    assert abs(ab2 - exact) < abs(euler - exact) / 4


def test_guidance_runs_both_halves_in_one_forward():
    calls = []

    def model(z, t):
        calls.append(z.shape[0])
        cond, uncond = torch.ones_like(z[:1]), torch.zeros_like(z[:1])
        return torch.cat([cond, uncond])

    z = torch.zeros(1, 4)
    assert torch.allclose(guided(model, 3.0)(z, torch.tensor(0.5)), torch.full((1, 4), 3.0))
    assert torch.allclose(guided(model, 0.0)(z, torch.tensor(0.5)), torch.zeros(1, 4))
    assert calls == [2, 2]


def test_side_guidance_steers_away_from_the_mirrored_report():
    rows = {"Right effusion": 5.0, "": 1.0, "Left effusion": 3.0}  # each text's velocity, one row each

    for guidance, expected in ((Guidance(3.0, side=2.0), 1 + 3 * 4 + 2 * 2), (Guidance(1.0, side=2.0), 5 + 2 * 2),
                               (Guidance(3.0), 1 + 3 * 4), (Guidance(1.0), 5)):
        texts = guidance.texts("Right effusion")
        assert len(texts) == guidance.branches and texts[0] == "Right effusion"
        values = torch.tensor([rows[text] for text in texts])[:, None]
        calls = []

        def model(z, t):
            calls.append(z.shape[0])
            return values.expand(-1, z.shape[1]) + z

        v = guidance.velocity(model)(torch.zeros(1, 2), torch.tensor(0.5))
        assert torch.allclose(v, torch.full((1, 2), float(expected))) and calls == [guidance.branches]


def test_side_guidance_until_drops_the_mirrored_row_in_the_later_steps():
    rows = {"Right effusion": 5.0, "": 1.0, "Left effusion": 3.0}
    guidance = Guidance(3.0, side=2.0, side_until=0.5)
    values = torch.tensor([rows[text] for text in guidance.texts("Right effusion")])[:, None]
    calls = []

    def model(z, t):
        calls.append(z.shape[0])
        return values[: len(z)].expand(-1, z.shape[1]) + z

    velocity = guidance.velocity(model)
    assert torch.allclose(velocity(torch.zeros(1, 2), torch.tensor(0.75)), torch.full((1, 2), 1 + 3 * 4 + 2 * 2.0))
    assert torch.allclose(velocity(torch.zeros(1, 2), torch.tensor(0.5)), torch.full((1, 2), 1 + 3 * 4.0))
    assert calls == [3, 2]
    sample(velocity, torch.zeros(1, 2), steps=16, method="ab2")
    assert calls[2:] == [3] * 8 + [2] * 8  # flow times 1 to 0.5625 with the mirrored row, 0.5 to 0.0625 without


def test_cancel_stops_between_steps():
    steps = []

    def velocity(z, t):
        steps.append(float(t))
        return z

    with pytest.raises(Cancelled):
        sample(velocity, torch.zeros(1), steps=10, method="euler", is_cancelled=lambda: len(steps) >= 3)
    assert len(steps) == 3


@pytest.mark.parametrize("steps, method, shift", [(0, "euler", 1.0), (5000, "euler", 1.0), (10, "rk45", 1.0),
                                                  (10, "heun", 0.0), (2.5, "heun", 1.0)])
def test_bad_settings_are_refused(steps, method, shift):
    with pytest.raises(RequestError):
        sample(lambda z, t: z, torch.zeros(1), steps=steps, method=method, shift=shift)
