"""The rectified-flow ODE sampler."""

import math

import pytest
import torch

from ctflow.errors import RequestError
from ctflow.conventions import right_half
from ctflow.places import OUTSIDE, Places
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


def test_side_guidance_guides_each_half_of_the_volume_by_its_own_text():
    """The right columns by the report, the left by the report without its right-only parts; above 1 each also away
    from the other's; then classifier-free guidance against the empty report."""
    report, places = "Right effusion. Heart normal.", Places(("Right effusion. Heart normal.", "Heart normal."),
                                                             ({OUTSIDE: 0}, {OUTSIDE: 1}))
    rows = {report: 5.0, "Heart normal.": 3.0, "": 1.0}  # each text's velocity, one row each
    for guidance, right, left in ((Guidance(3.0, 2.0, places=places), 1 + 3 * (3 + 2 * 2 - 1), 1 + 3 * (5 - 2 * 2 - 1)),
                                  (Guidance(1.0, 1.0, places=places), 5, 3), (Guidance(3.0), 1 + 3 * 4, 1 + 3 * 4),
                                  (Guidance(1.0), 5, 5)):
        texts = guidance.texts(report)
        assert len(texts) == guidance.branches and texts[0] == report
        values = torch.tensor([rows[text] for text in texts])[:, None, None, None, None]
        calls = []

        def model(z, t):
            calls.append(z.shape[0])
            return values + z

        v = guidance.velocity(model)(torch.zeros(1, 2, 1, 3, 4), torch.tensor(0.5))  # [B, C, T, rows, columns]
        assert torch.equal(v[..., :2], torch.full((1, 2, 1, 3, 2), float(right)))
        assert torch.equal(v[..., 2:], torch.full((1, 2, 1, 3, 2), float(left)))
        assert calls == [guidance.branches]


def test_finding_guidance_guides_away_from_the_report_without_its_findings():
    """v_cond + finding * (v_cond - v_reference), before classifier-free guidance; with side guidance, after each half
    has been guided by its own text; one forward with a row per text. On a block's first slices the finding term is
    eased in (FINDING_ONSET: none on the first, half on the second), so they continue the block before."""
    report, reference = "Right effusion. Heart normal.", "Heart."
    places = Places((report, "Heart normal."), ({OUTSIDE: 0}, {OUTSIDE: 1}))
    rows = {report: 5.0, "Heart normal.": 3.0, reference: 2.0, "": 1.0}
    for guidance, right, left in ((Guidance(1.0, finding=2.0), lambda w: 5 + 2 * w * 3, lambda w: 5 + 2 * w * 3),
                                  (Guidance(3.0, finding=1.0), lambda w: 1 + 3 * (5 + w * 3 - 1),
                                   lambda w: 1 + 3 * (5 + w * 3 - 1)),
                                  (Guidance(3.0, 1.0, 1.0, places), lambda w: 1 + 3 * (5 + w * 3 - 1),
                                   lambda w: 1 + 3 * (3 + w * 1 - 1))):
        texts = guidance.texts(report, reference)
        assert len(texts) == guidance.branches and texts[-1 - (guidance.scale != 1)] == reference
        values = torch.tensor([rows[text] for text in texts])[:, None, None, None, None]
        calls = []

        def model(z, t):
            calls.append(z.shape[0])
            return values + z

        v = guidance.velocity(model)(torch.zeros(1, 2, 4, 3, 4), torch.tensor(0.5))  # [B, C, T, rows, columns]
        for slice_, weight in enumerate((0.0, 0.5, 1.0, 1.0)):
            assert torch.equal(v[:, :, slice_, :, :2], torch.full((1, 2, 3, 2), float(right(weight))))
            assert torch.equal(v[:, :, slice_, :, 2:], torch.full((1, 2, 3, 2), float(left(weight))))
        assert calls == [guidance.branches]
    with pytest.raises(ValueError, match="without its findings"):
        Guidance(3.0, finding=1.0).texts(report)


def test_side_guidance_without_the_report_s_places_is_refused():
    with pytest.raises(ValueError, match="places"):
        Guidance(3.0, side=1.0)
    with pytest.raises(ValueError, match="places"):
        guided(lambda z, t: z, 3.0, side=1.0)
    assert Guidance(3.0).texts("Right effusion.") == ["Right effusion.", ""]


def test_side_guidance_mixes_any_number_of_place_texts_by_their_weights():
    """Three texts over a 2 x 4 grid (a lobe prior's places): each cell follows the weighted sum of the rows, and at
    side > 1 guides away from what the mirrored cell follows."""
    weights = torch.tensor([[[1.0, 0.5, 0, 0], [0, 0, 0, 0]],  # [texts, T=1 .. rows, columns]: add up to 1
                            [[0, 0.5, 0, 0], [1, 1, 0, 0]],
                            [[0, 0, 1, 1], [0, 0, 1, 1]]])[:, None]
    values = torch.tensor([4.0, 2.0, 1.0])[:, None, None, None, None]  # each text's velocity, a row each

    def model(z, t):
        assert z.shape[0] == 3
        return values + z

    z = torch.zeros(1, 1, 1, 2, 4)
    own = torch.tensor([[4.0, 3, 1, 1], [2, 2, 1, 1]])
    other = own.flip(-1)
    for side in (1.0, 2.0):
        v = guided(model, 1.0, side, places=lambda shape: weights)(z, torch.tensor(0.5))
        assert torch.allclose(v[0, 0, 0], other + side * (own - other))


def test_the_patient_s_right_is_the_first_half_of_the_columns():
    assert right_half(4).tolist() == [1, 1, 0, 0] and right_half(5).tolist() == [1, 1, 0.5, 0, 0]


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
