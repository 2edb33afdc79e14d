"""The autoregressive pipeline and its streaming API, on a tiny random model with the real MiniLM encoder."""

import dataclasses
import threading

import numpy as np
import pytest
import torch

from ctflow import CTFlowError, CTFlowPipeline, DeviceError, GenerationRequest, ReportError, RequestError
from ctflow.autoencoder import SliceAutoencoder
from ctflow.hub import default_model
from ctflow.model_folder import load_vae, read_config
from ctflow.conventions import real_slices
from ctflow.denoiser import STDiT
from ctflow.devices import select_device
from ctflow.report import (SIDED_FINDINGS, finding_code, half_code, half_reports, parse_report, render_prompt,
                           side_code, without_findings)
from ctflow.sampling import Guidance, block_velocity, denoiser_codes

REPORT = "Findings: A 12 mm nodule in the right upper lobe. Impressions: Right upper lobe nodule."


def run(pipeline, **options):
    return pipeline.generate(GenerationRequest(REPORT, **{"seed": 7, "steps": 3, **options}))


def test_blocks_stream_in_order_with_progress(tiny_pipeline):
    blocks = list(tiny_pipeline.stream(GenerationRequest(REPORT, slices=10, seed=1, steps=2)))
    assert [(b.index, b.start, b.stop) for b in blocks] == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]
    assert [b.blocks_done for b in blocks] == [1, 2, 3] and all(b.blocks_expected == 3 for b in blocks)
    assert all(b.hu.dtype == np.int16 and b.hu.shape[1:] == (16, 16) for b in blocks)
    assert blocks[-1].eta_s == 0 and all(b.eta_s >= 0 and b.block_s > 0 for b in blocks)
    elapsed = [b.elapsed_s for b in blocks]
    assert elapsed == sorted(elapsed)


def test_generate_is_the_stream_concatenated(tiny_pipeline):
    request = GenerationRequest(REPORT, slices=9, seed=4, steps=2)
    streamed = np.concatenate([b.hu for b in tiny_pipeline.stream(request)])
    assert np.array_equal(tiny_pipeline.generate(request).hu, streamed)


def test_exact_length_and_geometry(tiny_pipeline):
    volume = run(tiny_pipeline, slices=7)
    assert volume.shape == (7, 16, 16)
    assert volume.geometry.spacing == tiny_pipeline.config.geometry.spacing
    assert np.allclose(volume.geometry.ijk_to_ras()[:3, :3], np.diag([-1.5, -1.5, -2.5]))
    assert volume.provenance.slices_requested == 7 and not volume.provenance.partial


def test_same_seed_same_volume_other_seed_or_report_other_volume(tiny_pipeline):
    first = run(tiny_pipeline, slices=6, guidance=2.0)
    assert np.array_equal(first.hu, run(tiny_pipeline, slices=6, guidance=2.0).hu)
    assert not np.array_equal(first.hu, run(tiny_pipeline, slices=6, guidance=2.0, seed=8).hu)
    other_report = tiny_pipeline.generate(GenerationRequest("Findings: Large left pleural effusion.", slices=6,
                                                            seed=7, steps=3, guidance=2.0))
    assert not np.array_equal(first.hu, other_report.hu)


def test_a_drawn_seed_is_recorded_and_reproduces(tiny_pipeline):
    volume = tiny_pipeline.generate(GenerationRequest(REPORT, slices=4, steps=2))
    again = run(tiny_pipeline, slices=4, steps=2, seed=volume.provenance.seed)
    assert np.array_equal(volume.hu, again.hu)


def test_provenance_says_what_made_the_volume(tiny_pipeline):
    p = run(tiny_pipeline, slices=4, guidance=1.5, sampler="euler", shift=2.0).provenance
    assert (p.seed, p.steps, p.guidance, p.sampler, p.shift) == (7, 3, 1.5, "euler", 2.0)
    assert p.report.startswith("Findings: A 12 mm nodule") and "Length: 4 slices" in p.prompt
    assert p.model == "random-tiny" and len(p.model_sha256) == 64
    assert (p.device, p.dtype) == ("cpu", "float32")
    assert "SYNTHETIC" in p.synthetic and p.ctflow_version


def test_guidance_embeds_the_empty_report_alongside(tiny_pipeline):
    assert tiny_pipeline.plan(GenerationRequest(REPORT, guidance=3.0)).text.shape[0] == 2
    assert tiny_pipeline.plan(GenerationRequest(REPORT, guidance=1.0)).text.shape[0] == 1
    assert tiny_pipeline.plan(GenerationRequest(REPORT, guidance=3.0)).guidance.branches == 2


def half_prompts(plan):
    """The prompts of the report's halves, rendered as the plan's prompt is (no length asked; the model's spacing)."""
    return tuple(render_prompt(half, slice_spacing=2.5) for half in half_reports(parse_report(plan.report_text)))


def test_side_guidance_embeds_each_half_s_text_when_the_report_names_a_side(tiny_pipeline):
    plan = tiny_pipeline.plan(GenerationRequest(REPORT, guidance=3.0, side_guidance=4.0))
    assert plan.guidance.branches == plan.text.shape[0] == 3 and plan.guidance.side == 4.0
    right, left = half_prompts(plan)
    assert right == plan.prompt and left == "Findings: Not stated.\nImpressions: Not stated.\nSpacing: 2.5 mm"
    halves = tiny_pipeline.text_encoder.encode([right, left])
    assert torch.equal(plan.text[:2], halves.tokens)
    unsided = tiny_pipeline.plan(GenerationRequest("Findings: Emphysema.", guidance=3.0, side_guidance=4.0))
    assert unsided.guidance.branches == 2 and unsided.guidance.side == 0.0  # one text for both halves: no third row
    volume = run(tiny_pipeline, slices=4, side_guidance=4.0)
    assert volume.provenance.side_guidance == 4.0 and volume.provenance.guidance == 1.0  # the tiny model's default
    assert not np.array_equal(volume.hu, run(tiny_pipeline, slices=4).hu)
    assert run(tiny_pipeline, slices=4).provenance.side_guidance == 0.0  # the model's default


def test_finding_guidance_embeds_the_report_without_its_findings_when_it_reports_one(tiny_pipeline):
    """One more row, the report without its findings (report.without_findings, rendered as the prompt is), before
    the empty report's; none for a report without findings, which is made as without finding guidance."""
    plan = tiny_pipeline.plan(GenerationRequest(REPORT, guidance=3.0, finding_guidance=2.0))
    reference = render_prompt(without_findings(parse_report(REPORT)), None, 2.5)
    assert plan.guidance.finding == 2.0 and plan.code_texts == (plan.prompt, reference, "")
    assert reference == "Findings: Not stated.\nImpressions: Not stated.\nSpacing: 2.5 mm"
    alone = tiny_pipeline.text_encoder.encode([reference])
    length = alone.tokens.shape[1]  # the batch pads it to the prompt's length
    assert torch.allclose(plan.text[1:2, :length], alone.tokens, atol=1e-5) and not plan.text_mask[1, length:].any()
    normal = tiny_pipeline.plan(GenerationRequest("Findings: No effusion. Heart normal.", guidance=3.0,
                                                  finding_guidance=2.0))
    assert normal.guidance.finding == 0.0 and normal.guidance.branches == 2
    volume = run(tiny_pipeline, slices=4, finding_guidance=2.0)
    assert volume.provenance.finding_guidance == 2.0
    assert not np.array_equal(volume.hu, run(tiny_pipeline, slices=4).hu)
    assert run(tiny_pipeline, slices=4).provenance.finding_guidance == 0.0  # the model's default


NORMAL = "Findings: No cardiomegaly. No pulmonary nodule. No pleural effusion.\nImpressions: No acute abnormality."


def test_a_report_of_no_finding_is_drawn_from_the_model_s_normal_report(tiny_pipeline):
    """A user's normal report in other words, or one that only negates findings, is given to the model as the
    model's own normal report (config.normal_report): the same volume at the same seed, the user told, the user's
    words kept as the report on record. A report of a finding, and a model without a normal report, keep their own."""
    model = CTFlowPipeline(dataclasses.replace(tiny_pipeline.config, normal_report=NORMAL), tiny_pipeline.denoiser,
                           tiny_pipeline.autoencoder, tiny_pipeline.text_encoder)
    negations = "Findings: Lungs clear, no effusion. Heart not enlarged.\nImpressions: No emphysema."
    plan = model.plan(GenerationRequest(negations, seed=3, guidance=3.0, finding_guidance=2.0))
    assert plan.prompt == render_prompt(parse_report(NORMAL), None, 2.5)
    assert plan.report_text == parse_report(negations).text
    assert [n for n in plan.notices if "normal report" in n]
    said, normal = (model.generate(GenerationRequest(text, seed=3, steps=2, slices=4)) for text in (negations, NORMAL))
    assert np.array_equal(said.hu, normal.hu)
    assert said.provenance.prompt == normal.provenance.prompt and said.provenance.report != normal.provenance.report
    assert not [n for n in model.plan(GenerationRequest(NORMAL, seed=3)).notices if "normal report" in n]
    finding = model.plan(GenerationRequest(REPORT, seed=3))
    assert finding.prompt == render_prompt(parse_report(REPORT), None, 2.5)
    assert not [n for n in finding.notices if "normal report" in n]
    own = tiny_pipeline.plan(GenerationRequest(negations, seed=3))
    assert own.prompt == render_prompt(parse_report(negations), None, 2.5) and not own.notices


def test_side_guidance_gives_each_half_of_the_columns_its_own_text_s_velocity(tiny_pipeline):
    """With the real denoiser and latent layout: at side guidance 1 the patient's right columns move as the right
    half's text alone would move them, the left columns as the left half's (the rows in that order, the mask on the
    last axis)."""
    plan = tiny_pipeline.plan(GenerationRequest(REPORT, guidance=1.0, side_guidance=1.0))
    config = tiny_pipeline.config.denoiser
    size = config.latent_size
    previous = torch.zeros(1, config.latent_channels, config.block_slices, size, size)
    z, t = torch.randn_like(previous, generator=torch.Generator().manual_seed(0)), torch.tensor(0.7)

    def velocity(text, mask, guidance):
        with torch.no_grad():
            return block_velocity(tiny_pipeline.denoiser, previous, text, mask, 16, guidance)(z, t)

    sided = velocity(plan.text, plan.text_mask, plan.guidance)
    for half, columns in zip(half_prompts(plan), (slice(0, size // 2), slice(size // 2, None))):
        alone = tiny_pipeline.text_encoder.encode([half])
        expected = velocity(alone.tokens, alone.mask, Guidance(1.0))
        assert torch.allclose(sided[..., columns], expected[..., columns], atol=1e-5)
    assert not torch.allclose(sided, velocity(plan.text[:1], plan.text_mask[:1], Guidance(1.0)), atol=1e-3)


@pytest.mark.parametrize("option, code, embedding", [("side_code", side_code, "side_embed"),
                                                     ("side_map", half_code, "side_map_embed"),
                                                     ("finding_code", finding_code, "finding_embed"),
                                                     ("finding_map", finding_code, "finding_map_embed")])
def test_a_side_code_denoiser_is_told_each_row_s_sides(tiny_pipeline, option, code, embedding):
    """The rows' codes are those of the prompt's halves (side_code, half_code for a side_map denoiser, finding_code
    for a finding_code or finding_map one), and none
    for the empty report; such a denoiser warm-started from one without makes the same volume until its embedding
    learns something."""
    denoiser = STDiT(dataclasses.replace(tiny_pipeline.config.denoiser, **{option: True}))
    denoiser.load_state_dict(tiny_pipeline.denoiser.state_dict(), strict=False)  # as a warm start does
    config = dataclasses.replace(tiny_pipeline.config, denoiser=denoiser.config)
    sided = CTFlowPipeline(config, denoiser.eval(), tiny_pipeline.autoencoder, tiny_pipeline.text_encoder)
    plan = sided.plan(GenerationRequest(REPORT, guidance=3.0, side_guidance=4.0))
    expected = torch.tensor([*(code(half) for half in half_prompts(plan)), [0.0] * denoiser.config.code_size])
    codes = denoiser_codes(plan.code_texts, config.denoiser, 0)
    assert torch.equal(codes, expected) and expected[0].any() and not expected[1].any()
    options = {"slices": 4, "guidance": 3.0, "side_guidance": 4.0}
    assert np.array_equal(run(sided, **options).hu, run(tiny_pipeline, **options).hu)
    with torch.no_grad():
        getattr(denoiser, embedding).weight.normal_(0, 1.0)
    assert not np.array_equal(run(sided, **options).hu, run(tiny_pipeline, **options).hu)


def test_a_lobe_map_denoiser_reads_each_block_s_code_at_its_levels(tiny_pipeline, monkeypatch):
    """The right upper lobe's nodule is told to the blocks at the upper lobes' levels and to no block below them
    (report.LOBE_LEVELS, in a body of lobe_map_slices)."""
    block = tiny_pipeline.config.denoiser.block_slices
    denoiser = STDiT(dataclasses.replace(tiny_pipeline.config.denoiser, side_map=True, lobe_map_slices=4 * block))
    denoiser.load_state_dict(tiny_pipeline.denoiser.state_dict(), strict=False)
    config = dataclasses.replace(tiny_pipeline.config, denoiser=denoiser.config)
    lobed = CTFlowPipeline(config, denoiser.eval(), tiny_pipeline.autoencoder, tiny_pipeline.text_encoder)
    told = {}
    prepare = denoiser.prepare

    def recording(previous, text, mask, first_slice, code=None):
        told[int(first_slice)] = code
        return prepare(previous, text, mask, first_slice, code)

    monkeypatch.setattr(denoiser, "prepare", recording)
    lobed.generate(GenerationRequest(REPORT, slices=4 * block, seed=1, steps=2, guidance=1.0, side_guidance=0.0))
    nodule = list(SIDED_FINDINGS).index("nodule")
    right_nodule = [float(code[0, 2 * nodule]) for _, code in sorted(told.items())]  # one row: the report
    assert sorted(told) == [0, block, 2 * block, 3 * block] and right_nodule == [1.0, 1.0, 1.0, 0.0]
    assert all(not code[0, 2 * nodule + 1] for code in told.values())  # never on the left


def test_a_length_in_the_prompt_does_not_stop_the_volume_there(tiny_pipeline):
    asked = tiny_pipeline.plan(GenerationRequest(REPORT, prompt_slices=6, seed=2, steps=2))
    assert "Length: 6 slices" in asked.prompt and asked.request.slices is None  # the model ends the volume itself
    assert "Length: 5 slices" in tiny_pipeline.plan(GenerationRequest(REPORT, slices=5)).prompt  # slices: both
    volume = tiny_pipeline.generate(asked)
    assert volume.provenance.slices_requested is None and "Length: 6 slices" in volume.provenance.prompt
    assert len(volume.hu) == tiny_pipeline.config.max_slices  # not 6: the random model never ends, so its cap
    with pytest.raises(RequestError, match="prompt's length"):
        tiny_pipeline.plan(GenerationRequest(REPORT, prompt_slices=0))


def test_a_length_typed_into_the_report_is_text_and_the_caller_told(tiny_pipeline):
    typed = tiny_pipeline.plan(GenerationRequest("Findings: Normal chest.\nImpressions: Normal. LENGTH: 90 slices\n"
                                                 "Spacing: 1 mm"))
    assert typed.request.slices is None and "Length: 90 slices" not in typed.prompt.splitlines()  # no meta line
    assert [notice.split(":")[0] for notice in typed.notices] == ["the report's 'LENGTH", "the report's 'Spacing"]
    spacing = tiny_pipeline.config.geometry.spacing[2]
    assert "slice count" in typed.notices[0] and f"{spacing:g} mm apart" in typed.notices[1]
    assert tiny_pipeline.plan(GenerationRequest("Findings: The effusion's length is 4 cm.")).notices == ()


def test_overlong_report_is_used_and_the_caller_told(tiny_pipeline):
    plan = tiny_pipeline.plan(GenerationRequest("Findings: " + "nodule " * 400))
    assert plan.notices and "token limit" in plan.notices[0]
    long_left = "Findings: Right pleural effusion. " + "Left lower lobe nodule " * 300 + "."  # the right half is short
    sided = tiny_pipeline.plan(GenerationRequest(long_left, side_guidance=1.0))
    assert sided.guidance.side == 1.0 and sided.notices and "token limit" in sided.notices[0]


@pytest.mark.parametrize("options, error", [
    ({"report": "   "}, ReportError), ({"report": 3}, ReportError),
    ({"slices": 0}, RequestError), ({"slices": 100_000}, RequestError), ({"slices": 2.5}, RequestError),
    ({"steps": 0}, RequestError), ({"guidance": -1.0}, RequestError), ({"seed": -5}, RequestError),
    ({"sampler": "dpm"}, RequestError), ({"side_guidance": True}, RequestError),
    ({"side_guidance": float("nan")}, RequestError), ({"side_guidance": 31.0}, RequestError),
    ({"finding_guidance": float("inf")}, RequestError), ({"finding_guidance": -0.5}, RequestError),
    ({"finding_guidance": True}, RequestError),
    ({"steps": True}, RequestError), ({"seed": True}, RequestError), ({"slices": True}, RequestError),
    ({"guidance": True}, RequestError), ({"shift": True}, RequestError),  # JSON's true, through the worker
])
def test_bad_requests_fail_before_sampling(tiny_pipeline, options, error):
    with pytest.raises(error):
        tiny_pipeline.plan(GenerationRequest(**{"report": REPORT, **options}))


class CancelAfter:
    """A cancel flag that is raised once it has been polled `polls` times (polled once per sampling step)."""

    def __init__(self, polls):
        self.polls = polls

    def is_set(self):
        self.polls -= 1
        return self.polls < 0


def test_cancel_mid_block_keeps_the_finished_blocks_marked_partial(tiny_pipeline):
    volume = tiny_pipeline.generate(GenerationRequest(REPORT, slices=12, seed=1, steps=3), cancel=CancelAfter(5))
    assert volume.shape[0] == 4  # block 1 done (3 polls), block 2 cancelled mid-way
    assert volume.provenance.partial
    with pytest.raises(CTFlowError, match="cancelled before the first block"):
        tiny_pipeline.generate(GenerationRequest(REPORT, slices=12, seed=1, steps=3), cancel=CancelAfter(1))


def test_a_cancel_after_the_last_block_leaves_the_volume_whole(tiny_pipeline):
    cancel = threading.Event()
    volume = tiny_pipeline.generate(GenerationRequest(REPORT, slices=8, seed=1, steps=1), cancel=cancel,
                                    on_block=lambda block: block.is_last and cancel.set())  # pressed as it ends
    assert volume.shape[0] == 8 and not volume.provenance.partial


def test_cancel_from_another_thread_ends_the_worker(tiny_pipeline):
    cancel, first_block, result = threading.Event(), threading.Event(), {}

    def on_block(block):
        first_block.set()
        cancel.wait(5)

    worker = threading.Thread(target=lambda: result.update(volume=tiny_pipeline.generate(
        GenerationRequest(REPORT, slices=400, seed=1, steps=2), cancel=cancel, on_block=on_block)))
    worker.start()
    assert first_block.wait(30)
    cancel.set()
    worker.join(10)
    assert not worker.is_alive()
    assert result["volume"].provenance.partial and result["volume"].shape[0] < 400


@pytest.mark.parametrize("end_block, end_frame, slices", [(2, 1, 9), (2, 0, 8), (0, 3, 3)])
def test_white_slices_end_the_volume(steered, end_block, end_frame, slices):
    pipeline = steered(end_block, end_frame)
    blocks = list(pipeline.stream(GenerationRequest(REPORT, seed=0, steps=2)))
    assert blocks[-1].stop == slices
    tissue = pipeline._decode(pipeline.denoiser.tissue[:, None])[0]
    hu = np.concatenate([b.hu for b in blocks])
    assert np.abs(hu.astype(int) - tissue).max() <= 1  # every kept slice is tissue: the white ones were trimmed


@pytest.mark.parametrize("end_frame, slices", [(5, 21), (0, 16)])
def test_a_drawn_end_marker_ends_the_volume_where_the_latent_test_misses_it(tiny_pipeline, steered, end_frame, slices):
    folder = default_model()
    config = dataclasses.replace(read_config(folder), end_fraction=1.01)  # the latent test can never fire
    autoencoder = SliceAutoencoder(load_vae(folder), config.autoencoder)  # trained: it decodes the end latent to white
    base = CTFlowPipeline(config, tiny_pipeline.denoiser, autoencoder, tiny_pipeline.text_encoder)
    pipeline = steered(1, end_frame, base=base)  # block 1 turns white from end_frame on
    blocks = list(pipeline.stream(GenerationRequest(REPORT, seed=0, steps=2)))
    assert blocks[-1].stop == slices and blocks[0].stop == 16
    hu = np.concatenate([b.hu for b in blocks])
    assert real_slices(hu) == len(hu) and hu.reshape(len(hu), -1).mean(1).max() < 500  # no white slice kept
    assert real_slices(np.concatenate([hu, np.full((2, 256, 256), 1000, np.int16)])) == slices


def test_each_block_is_told_where_it_starts(steered):
    pipeline = steered(99, 0)
    pipeline.generate(GenerationRequest(REPORT, slices=10, seed=0, steps=2))
    assert pipeline.denoiser.first_slices == [0.0, 4.0, 8.0]


def test_requested_length_overrides_the_end_marker(steered):
    volume = steered(1, 0).generate(GenerationRequest(REPORT, slices=10, seed=0, steps=2))
    assert volume.shape[0] == 10


def test_hard_cap_when_the_model_never_ends(steered):
    volume = steered(99, 0, max_slices=6).generate(GenerationRequest(REPORT, seed=0, steps=2))
    assert volume.shape[0] == 6


def test_cuda_request_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert select_device("cuda").type == "cuda"
        return
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        select_device("cuda")
    assert select_device("auto").type == "cpu"
    with pytest.raises(DeviceError, match="unknown device"):
        select_device("tpu")


def test_a_gpu_index_the_machine_lacks_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine, as torch reports it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match="there is no cuda:7: this machine has 1 CUDA GPU "):
        select_device("cuda:7")


def test_out_of_memory_becomes_an_actionable_error(tiny_pipeline, monkeypatch):
    """A GPU cannot run here; the OOM a CUDA device raises is simulated at the denoiser call."""

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny_pipeline.denoiser, "forward", exhausted)
    with pytest.raises(DeviceError, match="out of cpu memory while generating block 1; close other programs using "
                                          "its memory or ask for fewer slices"):
        run(tiny_pipeline, slices=4)


def test_decode_ahead_makes_the_same_volume_and_ends_with_the_consumer(tiny_pipeline, monkeypatch):
    request = GenerationRequest(REPORT, slices=10, seed=3, steps=2)
    plain = tiny_pipeline.generate(request)
    ahead = list(tiny_pipeline.stream(request, decode_ahead=True))
    assert np.array_equal(plain.hu, np.concatenate([b.hu for b in ahead])) and ahead[0].provenance.block_slices == 4
    stream = tiny_pipeline.stream(GenerationRequest(REPORT, slices=400, seed=3, steps=2), decode_ahead=True)
    next(stream)
    stream.close()  # the consumer stops: the sampling worker must be gone, not left running
    assert not any(thread.name == "ctflow-sampler" for thread in threading.enumerate())

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tiny_pipeline.denoiser, "forward", exhausted)
    with pytest.raises(DeviceError, match="block 1"):  # the worker's error reaches the caller
        list(tiny_pipeline.stream(GenerationRequest(REPORT, slices=4, seed=3, steps=2), decode_ahead=True))
