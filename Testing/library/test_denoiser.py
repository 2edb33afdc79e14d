"""The spatial-temporal DiT."""

import dataclasses

import pytest
import torch

from ctflow.config import DENOISER_PRESETS, DenoiserConfig
from ctflow.denoiser import STDiT, parameter_count
from ctflow.errors import ModelError
from ctflow.conventions import right_half
from ctflow.report import SIDE_CODE_SIZE, finding_code

# CTFlow's published sizes (REFERENCE §1) at 16x32x32x16 latents, patch 2x2x2, 768-d report embedding.
PUBLISHED_MILLIONS = {"S": 36, "B": 146, "L": 512}


@pytest.mark.parametrize("preset", ["S", "B", "L"])
def test_presets_match_ctflow_parameter_counts(preset):
    config = DENOISER_PRESETS[preset]
    assert (config.latent_channels, config.block_slices, config.latent_size, config.patch_size) == (16, 16, 32, (2, 2, 2))
    with torch.device("meta"):  # count without allocating 2 GB for L
        count = parameter_count(STDiT(config))
    assert count / 1e6 == pytest.approx(PUBLISHED_MILLIONS[preset], rel=0.04)


def small_model(seed=0, **changes):
    torch.manual_seed(seed)
    model = STDiT(dataclasses.replace(DENOISER_PRESETS["tiny"], **changes))
    with torch.no_grad():  # the zero-initialised output layers would hide every effect below
        model.final.weight.normal_(0, 0.1)
        model.t_block[1].weight.normal_(0, 0.1)
        for block in model.blocks:
            block.cross.proj.weight.normal_(0, 0.1)
    return model.eval()


def inputs(batch=1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 4, 8, 8, generator=g)  # [B, C, T, H, W]
    previous = torch.randn(batch, 4, 4, 8, 8, generator=g)
    text = torch.randn(batch, 5, 384, generator=g)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    return x, previous, text, mask


def test_output_is_a_velocity_shaped_like_the_block():
    model = small_model()
    x, previous, text, mask = inputs(batch=2)
    v = model(x, torch.tensor([0.3, 0.9]), model.prepare(previous, text, mask))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


def test_split_embedding_equals_channel_concatenation():
    """CTFlow injects the previous block by channel concatenation; the sum of two patch convs is the same map."""
    model = small_model()
    x, previous, _, _ = inputs()
    conv = torch.nn.Conv3d(8, 32, kernel_size=(2, 2, 2), stride=(2, 2, 2))
    with torch.no_grad():
        conv.weight.copy_(torch.cat([model.x_embed.weight, model.previous_embed.weight], dim=1))
        conv.bias.copy_(model.x_embed.bias)
        split = model.x_embed(x) + model.previous_embed(previous)
    assert torch.allclose(conv(torch.cat([x, previous], dim=1)), split, atol=1e-5)


def test_time_previous_block_and_text_all_matter():
    model = small_model()
    x, previous, text, mask = inputs()
    t = torch.tensor([0.5])
    base = model(x, t, model.prepare(previous, text, mask))
    assert not torch.allclose(base, model(x, torch.tensor([0.9]), model.prepare(previous, text, mask)))
    assert not torch.allclose(base, model(x, t, model.prepare(previous + 1, text, mask)))
    assert not torch.allclose(base, model(x, t, model.prepare(previous, text.flip(1) * 2, mask)))


def test_masked_text_tokens_are_ignored():
    model = small_model()
    x, previous, text, mask = inputs()
    padded = torch.cat([text, torch.randn(1, 3, 384) * 50], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
    t = torch.tensor([0.5])
    assert torch.allclose(model(x, t, model.prepare(previous, text, mask)),
                          model(x, t, model.prepare(previous, padded, padded_mask)), atol=1e-5)


def test_slices_are_not_exchangeable():
    """Temporal position codes let the model tell the first slice of a block from the last."""
    model = small_model()
    x, previous, text, mask = inputs()
    cond = model.prepare(previous, text, mask)
    t = torch.tensor([0.5])
    flipped = model(x.flip(2), t, cond).flip(2)
    assert not torch.allclose(model(x, t, cond), flipped, atol=1e-4)


def test_clean_prediction_is_served_to_the_sampler_as_velocity():
    """z_t = (1 - t) clean + t noise, so velocity = (z_t - clean) / t; one Euler step to t = 0 lands on the estimate."""
    model = small_model(prediction="clean")
    x, previous, text, mask = inputs(batch=2)
    t = torch.tensor([0.25, 1.0])
    cond = model.prepare(previous, text, mask)
    clean = model.predict(x, t, cond)
    velocity = model(x, t, cond)
    assert torch.allclose(velocity, (x - clean) / t.view(-1, 1, 1, 1, 1), atol=1e-5)
    assert torch.allclose(x[1] - 1.0 * velocity[1], clean[1], atol=1e-5)
    velocity_model = small_model()
    assert torch.equal(velocity_model.predict(x, t, cond), velocity_model(x, t, cond))


def test_slice_position_starts_as_a_no_op_and_then_tells_blocks_apart():
    plain, placed = small_model(), small_model(slice_position=True)
    placed.load_state_dict(plain.state_dict(), strict=False)  # as a warm start does
    x, previous, text, mask = inputs()
    t = torch.tensor([0.5])
    base = plain(x, t, plain.prepare(previous, text, mask))
    assert torch.equal(base, placed(x, t, placed.prepare(previous, text, mask, torch.tensor(48.0))))
    with torch.no_grad():
        placed.position_embed.mlp[2].weight.normal_(0, 0.1)
    top = placed(x, t, placed.prepare(previous, text, mask, torch.tensor(0.0)))
    assert not torch.allclose(top, placed(x, t, placed.prepare(previous, text, mask, torch.tensor(48.0))))
    with pytest.raises(ValueError, match="first_slice"):
        placed.prepare(previous, text, mask)


def test_seam_context_starts_as_a_no_op_then_hands_the_last_slices_to_the_first_tokens():
    plain, seamed = small_model(), small_model(seam_context=True)
    seamed.load_state_dict(plain.state_dict(), strict=False)  # as a warm start does
    x, previous, text, mask = inputs()
    t = torch.tensor([0.5])
    assert torch.equal(plain(x, t, plain.prepare(previous, text, mask)), seamed(x, t, seamed.prepare(previous, text, mask)))
    with torch.no_grad():  # close the channel-concatenation path: the previous block can only come in at the seam
        seamed.previous_embed.weight.zero_()
        seamed.seam_embed.weight.normal_(0, 0.1)
    base = seamed(x, t, seamed.prepare(previous, text, mask))
    earlier, last = previous.clone(), previous.clone()
    earlier[:, :, :2] += 1.0  # the block's first patch of slices: far from the seam
    last[:, :, -2:] += 1.0  # its last patch: next to the new block's first slices
    assert torch.equal(base, seamed(x, t, seamed.prepare(earlier, text, mask)))
    assert not torch.allclose(base, seamed(x, t, seamed.prepare(last, text, mask)))


def test_pooled_text_starts_as_a_no_op_then_carries_the_report_to_every_layer():
    plain, pooled = small_model(), small_model(pooled_text=True)
    pooled.load_state_dict(plain.state_dict(), strict=False)  # as a warm start does
    for model in (plain, pooled):  # silence cross-attention: text can only come in through the vector
        for block in model.blocks:
            block.cross.proj.weight.data.zero_()
    x, previous, text, mask = inputs()
    other = text.flip(1)  # same tokens, other order: the same mean...
    other[0, 0] += 1.0  # ...but one token changed
    t = torch.tensor([0.5])
    assert torch.equal(plain(x, t, plain.prepare(previous, text, mask)), pooled(x, t, pooled.prepare(previous, text, mask)))
    assert torch.equal(plain(x, t, plain.prepare(previous, text, mask)), plain(x, t, plain.prepare(previous, other, mask)))
    with torch.no_grad():
        pooled.text_vector[-1].weight.normal_(0, 0.1)
    a = pooled(x, t, pooled.prepare(previous, text, mask))
    assert not torch.allclose(a, pooled(x, t, pooled.prepare(previous, other, mask)))
    assert torch.allclose(a, pooled(x, t, pooled.prepare(previous, text.flip(1), mask)), atol=1e-5)  # a mean: order-free
    padded, padded_mask = torch.cat([text, torch.randn(1, 3, 384)], 1), torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    assert torch.allclose(a, pooled(x, t, pooled.prepare(previous, padded, padded_mask)), atol=1e-5)  # padding ignored


def test_inconsistent_sizes_are_refused():
    with pytest.raises(ModelError, match="prediction"):
        DenoiserConfig(prediction="noise")
    with pytest.raises(ModelError, match="divisible"):
        DenoiserConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ModelError, match="does not divide"):
        DenoiserConfig(block_slices=15)
    with pytest.raises(ModelError, match="one of them"):
        DenoiserConfig(side_code=True, side_map=True)
    with pytest.raises(ModelError, match="one of them"):
        DenoiserConfig(side_map=True, finding_code=True)
    with pytest.raises(ModelError, match="one of them"):
        DenoiserConfig(finding_code=True, finding_map=True)
    with pytest.raises(ModelError, match="needs side_map"):
        DenoiserConfig(side_code=True, lobe_map_slices=128)
    with pytest.raises(ModelError, match="released"):
        DenoiserConfig(variant="released", lobe_map_slices=128)


def test_a_lobe_map_reads_each_block_at_its_levels_of_the_body():
    assert DenoiserConfig(side_map=True).code_levels(32) is None  # the whole report's code for every block
    lobed = DenoiserConfig(side_map=True, lobe_map_slices=128, block_slices=16)
    assert lobed.code_levels(0) == (0.0, 0.125) and lobed.code_levels(112) == (0.875, 1.0)
    text = "Findings: Consolidation in the left lower lobe."
    assert lobed.read_code(text, 0) == [0.0] * SIDE_CODE_SIZE and any(lobed.read_code(text, 64))
    assert lobed.read_code(text, 64) == DenoiserConfig(side_map=True).read_code(text, 0)


def test_side_code_starts_as_a_no_op_then_tells_the_sides_apart():
    plain, sided = small_model(), small_model(side_code=True)
    sided.load_state_dict(plain.state_dict(), strict=False)  # as a warm start does
    x, previous, text, mask = inputs()
    t = torch.tensor([0.5])
    right, left = torch.zeros(1, SIDE_CODE_SIZE), torch.zeros(1, SIDE_CODE_SIZE)
    right[0, 0], left[0, 1] = 1.0, 1.0  # a pleural effusion on the right / on the left
    base = plain(x, t, plain.prepare(previous, text, mask))
    assert torch.equal(base, sided(x, t, sided.prepare(previous, text, mask, code=right)))
    with torch.no_grad():
        sided.side_embed.weight.normal_(0, 0.1)
    assert not torch.allclose(sided(x, t, sided.prepare(previous, text, mask, code=right)),
                              sided(x, t, sided.prepare(previous, text, mask, code=left)))
    with pytest.raises(ValueError, match="code of the report"):
        sided.prepare(previous, text, mask)


@pytest.mark.parametrize("option, embedding", [("finding_code", "finding_embed"), ("finding_map", "finding_map_embed")])
def test_the_finding_code_starts_as_a_no_op_then_tells_a_finding_from_its_negation(option, embedding):
    plain, told = small_model(), small_model(**{option: True})
    told.load_state_dict(plain.state_dict(), strict=False)  # as a warm start does
    x, previous, text, mask = inputs()
    t = torch.tensor([0.5])
    asked = torch.tensor([finding_code("Findings: Emphysema in both upper lobes.")])
    negated = torch.tensor([finding_code("Findings: No evidence of emphysema.")])
    assert asked.sum() == 1 and not negated.any() and told.config.code_size == asked.shape[1]
    base = plain(x, t, plain.prepare(previous, text, mask))
    assert torch.equal(base, told(x, t, told.prepare(previous, text, mask, code=asked)))
    with torch.no_grad():
        getattr(told, embedding).weight.normal_(0, 0.1)
    assert torch.equal(base, told(x, t, told.prepare(previous, text, mask, code=negated)))  # no bias: none is nothing
    assert not torch.allclose(base, told(x, t, told.prepare(previous, text, mask, code=asked)))


def test_the_finding_map_tells_a_finding_to_the_patches_its_weights_name_on_every_slice():
    plain, mapped = small_model(), small_model(finding_map=True)
    mapped.load_state_dict(plain.state_dict(), strict=False)
    _, previous, text, mask = inputs()
    asked = torch.tensor([finding_code("Findings: Small left pleural effusion.")])
    patches, d = plain.prepare(previous, text, mask).previous.shape[2:]
    with torch.no_grad():  # the effusion's place: patch 3 alone
        mapped.finding_map_embed.weight.view(patches, d, -1)[3, :, int(asked.argmax())].normal_(0, 0.1)
    told = mapped.prepare(previous, text, mask, code=asked).previous - plain.prepare(previous, text, mask).previous
    moved = told.abs().sum(dim=(0, 1, 3)) > 0  # [s]: the patches the finding reached
    assert moved.tolist() == [index == 3 for index in range(patches)] and torch.allclose(told[:, :1], told, atol=1e-6)


def test_the_side_map_starts_as_a_no_op_then_tells_each_half_its_own_findings():
    plain, mapped = small_model(), small_model(side_map=True)
    mapped.load_state_dict(plain.state_dict(), strict=False)  # as a warm start does
    x, previous, text, mask = inputs()
    t = torch.tensor([0.5])
    none, right, left = (torch.zeros(1, SIDE_CODE_SIZE) for _ in range(3))
    right[0, 0], left[0, 1] = 1.0, 1.0  # a pleural effusion on the right / on the left
    base = plain(x, t, plain.prepare(previous, text, mask))
    assert torch.equal(base, mapped(x, t, mapped.prepare(previous, text, mask, code=right)))
    with torch.no_grad():
        mapped.side_map_embed.weight.normal_(0, 0.1)
    rows, columns = (size // patch for size, patch in zip(x.shape[3:], mapped.config.patch_size[1:]))
    on_the_right = torch.as_tensor(right_half(columns)) > 0.5  # [columns]: the patient's right in the first ones
    untold = mapped.prepare(previous, text, mask, code=none).previous  # [1, t, rows * columns, D]
    for code, where in ((right, on_the_right), (left, ~on_the_right)):
        told = mapped.prepare(previous, text, mask, code=code).previous
        changed = (told - untold).abs().sum(-1).view(-1, rows, columns) > 0  # [t, rows, columns]
        assert torch.equal(changed, where.expand_as(changed))  # every patch of its half, and only those
    with pytest.raises(ValueError, match="code of the report"):
        mapped.prepare(previous, text, mask)
