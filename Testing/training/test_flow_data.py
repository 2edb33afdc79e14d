"""Flow training's samples: StartBoost and text dropout, consecutive blocks, epochs and rank shares, samples that
depend on their position only, EndBoost, paired twins and FindingBoost.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from ctflow.config import DenoiserConfig, ModelConfig
from ctflow.errors import CTFlowError
from ctflow.report import SIDE_CODE_SIZE, Report, half_code, level_text, lobes_at, side_code
from ctflow.volume import Geometry, Volume
from ctflow_train import latent_store, train_flow
from ctflow_train.dataset import DatasetWriter
from ctflow_train.flow_data import Batch, BlockDataset, SamplingRules, ShareSampler, block_loader, collate, noises
from ctflow_train.latent_store import LatentStore, open_stores
from ctflow_train.options import loss_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


def test_batches_follow_startboost_and_text_dropout(tiny, cache):
    store = LatentStore(cache)
    batch = tiny.draw(cache, 5, start_p=1.0, text_drop=1.0)
    assert batch.x0.shape == batch.previous.shape == batch.before.shape == (5, 4, tiny.BLOCK, 8, 8)
    assert batch.first.all()
    assert torch.equal(batch.previous, store.start[None, :, None].expand_as(batch.previous))  # black previous
    assert torch.equal(batch.text[:, :2], store.empty[None].expand(5, -1, -1)) and batch.mask.sum(1).eq(2).all()
    batch = tiny.draw(cache, 50, start_p=0.0, text_drop=0.0)
    assert not batch.first.any()
    assert not torch.equal(batch.previous[0], store.start[:, None].expand_as(batch.previous[0]))
    lengths = set(batch.mask.sum(1).tolist())
    assert len(lengths) >= 2  # plain and length prompts both drawn
    assert 0 <= batch.t.min() and batch.t.max() <= 1 and tiny.draw(cache, 50, time_shift=3.0).t.mean() > batch.t.mean()


def test_batch_windows_are_consecutive_blocks_of_one_volume(tiny, cache):
    store = LatentStore(cache)
    batch = tiny.draw(cache, 20, seed=1, start_p=0.0)
    block = tiny.BLOCK
    padded = [torch.cat([store.start[None].expand(2 * block, -1, -1, -1), store.latents(v)]) for v in range(3)]
    for i in range(20):
        window = torch.cat([batch.before[i], batch.previous[i], batch.x0[i]], dim=1).permute(1, 0, 2, 3)  # [3T,C,h,w]
        assert any(torch.equal(window, v[o : o + 3 * block])
                   for v in padded for o in range(block, len(v) - 3 * block + 1))


def test_every_epoch_visits_each_volume_once_and_ranks_take_disjoint_shares(tiny, cache):
    stores = open_stores([cache, cache])
    dataset = BlockDataset(stores, SamplingRules(tiny.BLOCK), 0)
    numbers = [[3 * stores.index(store) + v for store, v in map(dataset.volume, range(e * 6, e * 6 + 6))]
               for e in range(3)]
    assert all(sorted(epoch) == list(range(6)) for epoch in numbers)
    assert len({tuple(epoch) for epoch in numbers}) > 1  # a new order each epoch
    ranks = [ShareSampler(rank, 2, 3, start=12) for rank in range(2)]
    taken = [list(itertools.islice(iter(sampler), 9)) for sampler in ranks]  # 3 steps of a global batch of 6
    assert not set(taken[0]) & set(taken[1]) and sorted(taken[0] + taken[1]) == list(range(12, 30))
    assert taken[0][:3] == [12, 13, 14] and taken[1][:3] == [15, 16, 17]


def test_a_sample_depends_on_its_position_only_not_on_the_worker_that_makes_it(tiny, cache):
    dataset = BlockDataset(open_stores([cache]), SamplingRules(tiny.BLOCK), 0)
    alone = collate([dataset[p] for p in range(12, 18)])
    loader = block_loader(dataset, ShareSampler(0, 1, 3, start=12), workers=2, pin_memory=False)
    batches = iter(loader)
    workers = [next(batches), next(batches)]
    for name in Batch.__annotations__:  # every field of the batch; prompts compared without their padding
        for i in range(6):
            batch, j = workers[i // 3], i % 3
            if name in ("text", "mask"):
                tokens = int(alone.mask[i].sum())
                assert int(batch.mask[j].sum()) == tokens and torch.equal(alone.text[i, :tokens], batch.text[j, :tokens])
            else:
                assert torch.equal(getattr(alone, name)[i], getattr(batch, name)[j]), name
    assert not torch.equal(alone.seed, tiny.draw(cache, 6, first=13).seed)
    noise = noises(alone, torch.device("cpu"), rollout=True)  # made from each sample's seed, whatever the batch
    assert torch.equal(noise.cond[4:], noises(tiny.draw(cache, 2, first=16), torch.device("cpu"), rollout=True).cond)
    assert noise.noise.shape == alone.x0.shape and noises(alone, torch.device("cpu"), rollout=False).rollout is None
    assert abs(float(noise.noise.std()) - 1) < 0.1 and not torch.equal(noise.noise, noise.cond)


def test_batches_say_where_each_block_starts(tiny, cache):
    store = LatentStore(cache)
    batch = tiny.draw(cache, 30, seed=3, start_p=0.3)
    for i in range(30):
        offset = int(batch.first_slice[i])
        assert bool(batch.first[i]) == (offset == 0)
        end = offset + tiny.BLOCK
        assert any(len(v) >= end and torch.equal(batch.x0[i].transpose(0, 1), v[offset:end])
                   for v in map(store.latents, range(len(store))))


def test_endboost_draws_blocks_that_hold_the_end_and_leaves_other_runs_alone(tiny, cache):
    white = LatentStore(cache).end[:, None]  # [C, 1, h, w]

    def holds_end(x0: torch.Tensor) -> bool:  # a white slice (as the store keeps it, in float16) in the block
        return bool(((x0.float() - white).abs().amax(dim=(0, 2, 3)) < 1e-2).any())

    assert all(map(holds_end, tiny.draw(cache, 30, seed=2, start_p=0.0, end_p=1.0).x0))  # at or after the end
    plain = tiny.draw(cache, 30, seed=2, start_p=0.0)
    assert sum(map(holds_end, plain.x0)) < 30
    assert torch.equal(tiny.draw(cache, 30, seed=2, start_p=0.0, end_p=0.0).x0, plain.x0)  # off: the draws of before


def test_paired_twins_give_every_second_sample_a_twin_with_the_same_draws(tiny, twin_store):
    stores = open_stores([twin_store])
    names = stores[0].names
    paired = BlockDataset(stores, SamplingRules(tiny.BLOCK, start_p=0.0, text_drop=0.0, paired_twins=True), 4)
    plain = BlockDataset(stores, SamplingRules(tiny.BLOCK, start_p=0.0, text_drop=0.0), 4)
    assert paired.twins == {0: [1, 2], 1: [0, 2], 2: [0, 1]}  # the fourth volume is another patient
    pairs, other_blocks = 0, 0
    for first in range(0, 16, 2):
        a, b = paired[first], paired[first + 1]
        assert torch.equal(a["x0"], plain[first]["x0"])  # the pair's first sample is what it was
        _, volume = paired.volume(first)
        if names[volume] == "synth_0_00001":  # no twin: an ordinary sample
            assert torch.equal(b["x0"], plain[first + 1]["x0"]) and not b["twin"]
            continue
        pairs += 1
        assert all(torch.equal(a[k], b[k]) for k in ("first_slice", "t", "seed", "rollout_u", "rollout_t"))
        assert not torch.equal(a["text"], b["text"])  # another report
        assert b["twin"] and not a["twin"]
        other_blocks += not torch.equal(a["x0"], b["x0"])  # another volume (unless the block is all white end slices)
    assert pairs >= 3 and other_blocks >= 2
    batch = tiny.draw(twin_store, 8, seed=4, start_p=0.0, text_drop=0.0)
    assert torch.equal(batch.x0, collate([plain[p] for p in range(8)]).x0)  # off: the draws of before
    with pytest.raises(CTFlowError, match="even --batch"):
        train_flow.train(tiny.flow_run(twin_store, twin_store.parent / "odd", paired_twins=True))


@pytest.fixture(scope="module")
def variant_store(tiny, vae_run, tmp_path_factory):
    """A patient with three report variants, his twin without emphysema, and another patient."""
    rng = np.random.default_rng(6)
    patient = tiny.labels(0)["findings"]
    labels = {"synth_0_00000": patient, "synth_0_00000_without_emphysema": {**patient, "emphysema": {"present": False}},
              "synth_0_00001": tiny.labels(1)["findings"]}
    return tiny.latent_store(vae_run, tmp_path_factory.mktemp("variants"),
                           {name: tiny.volume(rng, 14) for name in labels}, labels, variants=3)


def test_report_variants_replace_the_report_where_drawn_and_twins_take_their_pairs(tiny, variant_store, cache):
    store = LatentStore(variant_store)
    assert store.variants == 3 and LatentStore(cache).variants == 0
    report = store.text("plain", 0)
    variants = [store.text("plain", 0, k) for k in range(3)]
    assert all(not torch.equal(v, report) for v in variants) and not torch.equal(variants[0], variants[1])
    assert len(store.text("length", 0, 2)) > len(variants[2])  # with "Length: N slices", as the report's

    def which(sample, volume: int) -> str:
        """The prompt a sample took of its volume: "report" or the variant's number."""
        for kind in ("plain", "length"):
            if torch.equal(sample["text"], store.text(kind, volume)):
                return "report"
            for k in range(3):
                if torch.equal(sample["text"], store.text(kind, volume, k)):
                    return str(k)
        raise AssertionError("a prompt the store does not hold")

    rules = dict(start_p=0.0, text_drop=0.0, paired_twins=True)
    mixed = BlockDataset(open_stores([variant_store]), SamplingRules(tiny.BLOCK, variant_p=0.5, **rules), 3)
    taken = [which(mixed[p], mixed.volume(p)[1]) if p % 2 == 0 else None for p in range(40)]
    assert {"report", "0", "1", "2"} <= set(taken) - {None}
    for first in range(0, 40, 2):
        twin = mixed.partner(first + 1)
        if twin is not None:  # the twin's prompt is its own report or variant of the same number
            assert which(mixed[first + 1], mixed.locate(twin)[1]) == taken[first]
    plain = BlockDataset(open_stores([variant_store]), SamplingRules(tiny.BLOCK, **rules), 3)
    off = BlockDataset(open_stores([variant_store]), SamplingRules(tiny.BLOCK, variant_p=0.0, **rules), 3)
    assert all(torch.equal(plain[p]["text"], off[p]["text"]) and torch.equal(plain[p]["x0"], off[p]["x0"])
               for p in range(12))  # off: the draws of before
    with pytest.raises(CTFlowError, match="report variants"):
        train_flow.train(tiny.flow_run(cache, cache.parent / "novariants", variant_p=0.5))


def test_variants_need_the_findings_and_a_store_keeps_its_count(tiny, vae_run, variant_store, tmp_path):
    with DatasetWriter(tmp_path / "data") as writer:  # as prepare-ctrate writes: no label files
        writer.add("ct_0", Volume(tiny.volume(np.random.default_rng(0), 14), Geometry((2.0, 2.0, 2.5)), None),
                   Report(findings="Normal.", impressions="Normal."))
    with pytest.raises(CTFlowError, match="--variants needs the findings"):
        latent_store.build_store(tmp_path / "data", vae_run[0] / "vae", tmp_path / "latents", 0, tiny.SIZE,
                                 ModelConfig().text, variants=2, log=lambda line: None)
    assert not (tmp_path / "latents").exists()
    with pytest.raises(CTFlowError, match="holds variants 3, not 2"):
        latent_store.build_store(variant_store.parent / "data", vae_run[0] / "vae", variant_store, 0, tiny.SIZE,
                                 ModelConfig().text, variants=2, log=lambda line: None)


@pytest.fixture(scope="module")
def finding_store(tiny, vae_run, tmp_path_factory):
    """A patient and its twin that differs in slices 13-14 alone (a finding), and another patient without a twin."""
    rng = np.random.default_rng(7)
    patient = tiny.volume(rng, 30)
    twin = patient.copy()
    twin[13:15] += 600  # a dense finding across two slices
    return tiny.latent_store(vae_run, tmp_path_factory.mktemp("finding"), {
        "synth_0_00000": patient, "synth_0_00000_with_emphysema": twin, "synth_0_00001": tiny.volume(rng, 30)})


def test_findingboost_gives_twin_pairs_blocks_that_the_finding_reaches(tiny, finding_store):
    stores = open_stores([finding_store])
    names = stores[0].names

    def pairs(finding_p: float) -> list[tuple[dict, dict, str]]:
        rules = SamplingRules(tiny.BLOCK, start_p=0.3, text_drop=0.0, paired_twins=True, finding_p=finding_p)
        dataset = BlockDataset(stores, rules, 3)
        return [(dataset[p], dataset[p + 1], names[dataset.volume(p)[1]]) for p in range(0, 60, 2)]

    # slices 13-14 lie in the blocks starting at 10-14 (a block starts at 0 or a whole block in; 4 slices each)
    assert BlockDataset(stores, SamplingRules(tiny.BLOCK, paired_twins=True, finding_p=1.0), 3).finding_offsets(0, 1) \
        == [10, 11, 12, 13, 14]
    boosted, plain = pairs(1.0), pairs(0.0)
    twin_pairs = [(a, b) for a, b, name in boosted if name != "synth_0_00001"]
    assert len(twin_pairs) >= 10
    for a, b in twin_pairs:  # every twin pair's block holds the finding, the same block in both
        assert 10 <= float(a["first_slice"]) <= 14 and torch.equal(a["first_slice"], b["first_slice"])
        assert not torch.equal(a["x0"], b["x0"]) and b["twin"]
    missed = [a for a, b, name in plain if name != "synth_0_00001" and torch.equal(a["x0"], b["x0"])]
    assert missed  # without FindingBoost many a pair's block misses the finding
    for (a, _, name), (c, _, _) in zip(boosted, plain):  # pairs without a twin draw as before
        if name == "synth_0_00001":
            assert torch.equal(a["x0"], c["x0"]) and torch.equal(a["first_slice"], c["first_slice"])


def test_pair_loss_is_the_relative_error_of_the_twins_difference_where_the_finding_reaches():
    """Averaged over the 3 pair slots of a batch of 6, the slot whose block the finding misses counting zero."""
    target = torch.randn(6, 2, 3, 4, 4)
    target[3] = target[2]  # the second pair's twin differs by nothing (the finding lies outside this block)
    target[5] = target[4] + 0.5  # the third pair differs everywhere
    twin = torch.tensor([False, True, False, True, False, True])
    assert train_flow.pair_loss(target, target, twin) == 0  # the differences drawn exactly
    same = target.clone()
    same[1], same[5] = same[0], same[4]  # each twin drawn like its pair: the whole difference missed
    assert train_flow.pair_loss(same, target, twin).item() == pytest.approx(2 / 3)
    half = target.clone()
    half[5] = target[4] + 0.25  # half the difference drawn in one pair of the two the finding reaches: error 1/4
    assert train_flow.pair_loss(half, target, twin).item() == pytest.approx(0.25 / 3)
    spurious = target.clone()
    spurious[3] += 0.1  # a difference drawn where the finding is not: no pull towards drawing both alike
    assert train_flow.pair_loss(spurious, target, twin) == 0
    assert train_flow.pair_loss(same, target, torch.tensor([False] * 6)) == 0  # no twin pairs
    assert train_flow.pair_loss(spurious, target, torch.tensor([False, False, False, True, False, False])) == 0


def test_region_loss_is_both_twins_error_inside_where_their_targets_differ():
    """Averaged over the 2 pair slots of a batch of 4, the slot whose block the finding misses counting zero."""
    target = torch.zeros(4, 2, 3, 4, 4)
    target[1, :, 1, 2, 2] = 1.0  # the first pair's twin differs at one latent position: the finding's region
    target[3] = target[2]  # the second pair: the finding misses this block
    twin = torch.tensor([False, True, False, True])
    assert train_flow.region_loss(target, target, twin) == 0
    outside = target.clone()
    outside[:, :, 0] += 3.0  # errors away from the finding are the plain MSE's, not this loss's
    assert train_flow.region_loss(outside, target, twin) == 0
    missed = target.clone()
    missed[1] = target[0]  # the twin drawn without its finding: squared error 1 in one twin of two
    assert train_flow.region_loss(missed, target, twin).item() == pytest.approx(0.5 / 2)
    swapped = missed.clone()
    swapped[0, :, 1, 2, 2] = 1.0  # and the finding drawn into the twin that negates it: error in both
    assert train_flow.region_loss(swapped, target, twin).item() == pytest.approx(1.0 / 2)
    assert train_flow.region_loss(swapped, target, torch.tensor([False] * 4)) == 0  # no twin pairs
    faint = target.clone()
    faint[1, :, 1, 2, 2] = 0.01  # a difference under FINDING_REACH is no region
    assert train_flow.region_loss(swapped, faint, twin) == 0


@pytest.mark.parametrize("weight, column", [("pair_weight", "pair_loss"), ("region_weight", "region_loss")])
def test_twin_losses_train_on_twin_pairs_and_log_their_loss(tiny, twin_store, tmp_path, weight, column):
    run = tiny.flow_run(twin_store, tmp_path / "pairs", paired_twins=True, batch_size=4, **{weight: 1.0})
    assert np.isfinite(train_flow.train(run)["loss"])
    with open(tmp_path / "pairs" / "loss.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == run.steps and all(float(row[column]) >= 0 for row in rows)
    assert any(float(row[column]) > 0 for row in rows)  # the twins' differences reached the loss
    assert set(rows[0]) == {"step", "lr", "loss", "step_s", column}  # only the losses the run adds
    with pytest.raises(CTFlowError, match="needs --paired-twins"):
        train_flow.train(dataclasses.replace(run, out=tmp_path / "bad", paired_twins=False))
    for bad in ("nan", "-1"):  # refused by the parser, as every loss weight is
        with pytest.raises(argparse.ArgumentTypeError, match="finite"):
            loss_weight(bad)


def test_findingboost_puts_the_finding_into_the_region_loss(tiny, finding_store, tmp_path):
    def reached_steps(finding_p: float) -> int:  # steps whose region loss saw a finding
        run = tiny.flow_run(finding_store, tmp_path / str(finding_p), paired_twins=True, batch_size=4, steps=8,
                            region_weight=1.0, finding_p=finding_p)
        train_flow.train(run)
        with open(run.out / "loss.csv") as handle:
            return sum(float(row["region_loss"]) > 0 for row in csv.DictReader(handle))

    assert reached_steps(1.0) > reached_steps(0.0)  # 7 of 8 steps against 1 of 8


def test_the_side_code_is_the_drawn_prompt_s_and_none_for_the_empty_one(tiny, twin_store, variant_store):
    stores = open_stores([twin_store])
    sided = BlockDataset(stores, SamplingRules(tiny.BLOCK, text_drop=0.5, code=DenoiserConfig(side_code=True)), 3)
    prompts = latent_store.Prompts(stores, variants=False)
    seen = set()
    for position in range(30):
        sample, number = sided[position], sided.number(position)
        dropped = torch.equal(sample["text"], sided.locate(number)[0].empty)
        expected = torch.zeros(SIDE_CODE_SIZE) if dropped else torch.tensor(side_code(prompts.writer_prompt(number)))
        assert torch.equal(sample["code"], expected)
        seen.add((dropped, bool(expected.any())))
    assert seen == {(True, False), (False, True), (False, False)}  # "... with right consolidation." among them
    off = BlockDataset(stores, SamplingRules(tiny.BLOCK, text_drop=0.5), 3)
    assert all(not off[p]["code"].any() and torch.equal(off[p]["x0"], sided[p]["x0"]) for p in range(8))
    stores = open_stores([variant_store])  # report variants: the variant's own words give the code
    varied = BlockDataset(stores, SamplingRules(tiny.BLOCK, text_drop=0.0, variant_p=1.0,
                                                code=DenoiserConfig(side_code=True)), 3)
    prompts = latent_store.Prompts(stores)
    for position in range(12):
        number = varied.number(position)
        codes = [torch.tensor(side_code(prompts.variant_prompt(number, k))) for k in range(3)]
        assert any(torch.equal(varied[position]["code"], code) for code in codes)
        assert any(code.any() for code in codes)  # tiny's sided findings are on the right
    halved = BlockDataset(stores, SamplingRules(tiny.BLOCK, text_drop=0.0, variant_p=1.0,
                                                code=DenoiserConfig(side_map=True)), 3)  # a side_map's: per half
    for position in range(12):
        number = halved.number(position)
        codes = [torch.tensor(half_code(prompts.variant_prompt(number, k))) for k in range(3)]
        assert any(torch.equal(halved[position]["code"], code) for code in codes)
    lobed = DenoiserConfig(side_map=True, lobe_map_slices=8 * tiny.BLOCK, block_slices=tiny.BLOCK)
    by_levels = BlockDataset(stores, SamplingRules(tiny.BLOCK, text_drop=0.0, variant_p=1.0, code=lobed), 3)
    untold = set()
    for position in range(24):  # a lobe_map denoiser's: of the report where only the lobes at the block's levels lie
        sample, number = by_levels[position], by_levels.number(position)
        first, texts = int(sample["first_slice"]), [prompts.variant_prompt(number, k) for k in range(3)]
        at_levels = [torch.tensor(half_code(level_text(text, lobes_at(lobed.code_levels(first))))) for text in texts]
        assert any(torch.equal(sample["code"], code) for code in at_levels)
        if not any(torch.equal(sample["code"], torch.tensor(half_code(text))) for text in texts):
            untold.add(first)  # the right lower lobe's consolidation, not in the body's top quarter (LOBE_LEVELS)
    assert untold == {0, tiny.BLOCK}


def test_prompts_refuse_a_cohort_that_no_longer_holds_the_store_s_volumes(twin_store):
    store = LatentStore(twin_store)
    assert latent_store.Prompts([store], variants=False).writer[0].findings == "synth 0 00000."
    store.names[0] = "synth_9_00000"  # as if the cohort had been made again with other patients
    with pytest.raises(CTFlowError, match="is not in .* the folder it was encoded from"):
        latent_store.Prompts([store], variants=False)
