"""The published CTFlow checkpoint: our loader and sampling mode against golden outputs of the original code.

Testing/data/ctflow_release/ holds a tiny checkpoint in the released layout and what the original code computed with
it (forward, intermediates, Euler runs, a 3-block generation); tolerances from its README.
"""

import argparse
import dataclasses
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ctflow.config import ModelConfig, SamplingConfig
from ctflow.denoiser import STDiT
from ctflow.errors import ModelError, RequestError
from ctflow.ending import VolumeEnd, white_distance, white_frames
from ctflow.pipeline import CTFlowPipeline, GenerationPlan, GenerationRequest
from ctflow import load_released_denoiser
from ctflow.released import build_released_stdit, save_released_layout
from ctflow.sampling import Guidance, sample

DATA = Path(__file__).parents[1] / "data" / "ctflow_release"
TINY_A = DATA / "tiny_a"
FORWARD_TOL, EULER3_TOL, EULER200_TOL, VOLUME_TOL = 2e-5, 5e-5, 5e-4, 1e-3


def fixture(name):
    return {key: value.clone() for key, value in load_file(DATA / name).items()}  # clones: aligned memory


@pytest.fixture(scope="module")
def io():
    return fixture("tiny_a_io.safetensors")


@pytest.fixture(scope="module")
def released():
    return load_released_denoiser(TINY_A)


@torch.no_grad()
@pytest.mark.parametrize("t, key", [(1.0, "out/t1p0"), (0.5, "out/t0p5"), (0.0, "out/t0p0")])
def test_forward_matches_the_original(released, io, t, key):
    out = released(io["x"], torch.tensor(t), io["encoder_hidden_states"], io["cond_image"])
    assert (out - io[key]).abs().max() < FORWARD_TOL


@torch.no_grad()
def test_forward_with_a_time_per_sample_matches_the_original(released, io):
    out = released(io["x"], io["t_batch"], io["encoder_hidden_states"], io["cond_image"])
    assert (out - io["out/t_batch"]).abs().max() < FORWARD_TOL


@torch.no_grad()
def test_intermediates_match_the_original_in_order(released, io):
    """Where a mismatch starts: patch embedding, time, text, each block, final layer."""
    model, seen = released.stdit, {}

    def keep(name, reshape=lambda out: out):
        return lambda module, args, out: seen.__setitem__(name, reshape(out))

    tokens = lambda out: out.flatten(1, 2)  # [B, t, s, D] -> [B, N, D]
    hooks = [model.t_embed.register_forward_hook(keep("t_embedder_out")),
             model.t_block.register_forward_hook(keep("t_block_out")),
             model.text_embed.register_forward_hook(keep("y_embedder_out", lambda out: out[:, :, None])),
             model.final.register_forward_hook(keep("final_layer_out"))]
    hooks += [block.register_forward_hook(keep(f"block{i}_out", tokens)) for i, block in enumerate(model.blocks)]
    try:
        released(io["x"], torch.tensor(0.5), io["encoder_hidden_states"], io["cond_image"])
    finally:
        for hook in hooks:
            hook.remove()
    patches = model.x_embed(io["x"]) + model.previous_embed(io["cond_image"])  # [B, D, t, h, w]
    seen["x_embedder_out"] = patches.flatten(2).transpose(1, 2)
    for name in ["x_embedder_out", "t_embedder_out", "t_block_out", "y_embedder_out", "block0_out", "block1_out",
                 "final_layer_out"]:
        assert (seen[name] - io[f"inter/{name}"]).abs().max() < FORWARD_TOL, name


@torch.no_grad()
@pytest.mark.parametrize("steps, grid, key, tol", [
    (3, "euler/grid3", "euler/steps3_full_interval", EULER3_TOL),
    (200, "euler/grid201", "euler/all200_of_201", EULER200_TOL),
])
def test_euler_runs_match_the_original(released, io, steps, grid, key, tol):
    text, cond = io["encoder_hidden_states"][:1], io["cond_image"][:1]
    evaluated = []

    def velocity(z, t):
        evaluated.append(float(t))
        return released(z, t, text, cond)

    out = sample(velocity, io["euler/noise"], steps, "euler")
    assert evaluated == io[grid][:-1].tolist()  # the released grid, bit for bit: t = 0 is never evaluated
    assert (out - io[key]).abs().max() < tol


def test_other_sizes_and_patch_shapes_load_from_their_config(tmp_path):
    """Nothing is tied to the fixture's shape: a differently shaped released folder round-trips exactly."""
    config = dataclasses.replace(build_released_stdit(TINY_A).config, hidden_size=48, depth=3, num_heads=3,
                                 patch_size=(1, 2, 4), block_slices=8, latent_size=16, latent_channels=4, text_dim=32)
    torch.manual_seed(0)
    model = STDiT(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    loaded = load_released_denoiser(save_released_layout(model, tmp_path / "other"))
    assert loaded.config == config
    x, cond = torch.randn(2, 4, 8, 16, 16), torch.randn(2, 4, 8, 16, 16)
    text = torch.randn(2, 1, 32)
    with torch.no_grad():
        expected = model(x, torch.tensor([0.3, 0.8]), model.prepare(cond, text, torch.ones(2, 1, dtype=torch.bool)))
        assert torch.equal(loaded(x, torch.tensor([0.3, 0.8]), text, cond), expected)


# -- bad inputs: one clear error each --------------------------------------------------------------------------

def copy_fixture(tmp_path):
    return Path(shutil.copytree(TINY_A, tmp_path / "denoiser"))


def test_a_pickle_checkpoint_is_refused_before_it_is_read(tmp_path):
    folder = copy_fixture(tmp_path)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 not read")
    with pytest.raises(ModelError, match="only pickle weights .*safetensors"):
        load_released_denoiser(folder)
    with pytest.raises(ModelError, match="pickle checkpoint; ctflow loads only safetensors"):
        load_released_denoiser(folder / "diffusion_pytorch_model.bin")


def test_a_config_of_another_class_is_refused(tmp_path):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelError, match="describes a UNet2DConditionModel, not a released CTFlow denoiser"):
        load_released_denoiser(folder)


def test_missing_folder_and_mismatched_weights_are_refused(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_released_denoiser(tmp_path / "nowhere")
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "depth": 3}))
    with pytest.raises(ModelError, match="does not fit its config.json"):
        load_released_denoiser(folder)
    (folder / "config.json").write_text(json.dumps({**config, "mlp_ratio": 2.0}))
    with pytest.raises(ModelError, match="does not fit its config.json: size mismatch"):
        load_released_denoiser(folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    state["model.pos_embed"] = state["model.pos_embed"].flip(1).contiguous()  # a row-first code: another model
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not the published code's position code"):
        load_released_denoiser(folder)


def test_wrong_text_width_is_refused(released, io):
    with pytest.raises(ModelError, match=r"text embedding must be \[B, M, 768\]"):
        released(io["x"], torch.tensor(0.5), torch.zeros(2, 1, 384), io["cond_image"])


# -- the text side: CT-CLIP's text tower, [CLS] pooling, precomputed embeddings --------------------------------

def test_converted_ct_clip_text_tower_gives_the_unit_cls_vector(released_downloads, released_model):
    from ctflow.config import TextConfig
    from ctflow.text_encoder import TextEncoder

    converted = released_downloads.root / "ct-clip-text"  # what `ctflow convert-ct-clip` wrote
    assert (converted / "model.safetensors").is_file() and not list(converted.glob("*.bin"))
    assert "auto_map" not in (converted / "tokenizer_config.json").read_text()  # no code named, ever
    encoder = TextEncoder.load(TextConfig(source="folder:ct-clip-text", mode="cls", max_tokens=512),
                               released_downloads.root)
    texts = ["Findings: right pleural effusion.", "No acute emphysema."]
    out = encoder.encode(texts)
    assert out.tokens.shape == (2, 1, 768) and out.mask.all()
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        cls = released_downloads.bert(**batch).last_hidden_state[:, :1]
    assert torch.allclose(out.tokens, cls / (cls.norm(dim=-1, keepdim=True) + 1e-6), atol=1e-5)
    assert not torch.allclose(out.tokens[0], out.tokens[1])


def test_the_converter_refuses_executable_pickles_and_other_checkpoints(tmp_path, released_downloads):
    from ctflow.ct_clip import convert_ct_clip_text

    tokenizer = released_downloads.tokenizer
    hostile = tmp_path / "hostile.pt"
    torch.save({"text_transformer.x": argparse.Namespace(run="code")}, hostile)  # a pickled object
    with pytest.raises(ModelError, match="not a plain tensor checkpoint"):
        convert_ct_clip_text(hostile, tokenizer, tmp_path / "out")
    other = tmp_path / "other.pt"
    torch.save({"visual.weight": torch.zeros(2)}, other)
    with pytest.raises(ModelError, match="no text_transformer.* BERT weights"):
        convert_ct_clip_text(other, tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the original's sampling as our pipeline's "released" mode --------------------------------------------------

@pytest.fixture(scope="module")
def autoencoder(released_downloads):
    """The tiny FLUX-configuration VAE, with the released model's HU mapping."""
    from diffusers import AutoencoderKL

    from ctflow.autoencoder import SliceAutoencoder

    vae = AutoencoderKL.from_pretrained(released_downloads.vae, use_safetensors=True, local_files_only=True)
    return SliceAutoencoder(vae, released_model_config().autoencoder)


def released_model_config(**sampling) -> ModelConfig:
    from ctflow.config import AutoencoderConfig, TextConfig

    return ModelConfig(
        name="released-tiny", denoiser=build_released_stdit(TINY_A).config,
        autoencoder=AutoencoderConfig(image_size=16, pixel_range=(0.0, 1.0)),
        text=TextConfig(source="folder:text_encoder", mode="cls", max_tokens=512),
        sampling=SamplingConfig(steps=200, method="euler", mode="released", guidance_supported=False, **sampling),
        max_slices=48, end_tolerance=0.1, end_fraction=0.9,
    )


class FixtureNoise(CTFlowPipeline):
    """The pipeline with the original run's random draws (start/end markers, one noise per block) put back; its
    "decoder" hands the kept latents [C, n, h, w] through as [n, C, h, w], to compare with the original's latents."""

    def __init__(self, *args, draws, **kwargs):
        super().__init__(*args, **kwargs)
        self.draws = draws
        self.noises = iter(draws["noises"][:, None])

    def _markers(self, seed):
        return self.draws["init_block_scaled"][0, :, 0], self.draws["one_latent_scaled"][0]

    def _block_noise(self, shape, generator):
        return next(self.noises)

    def _decode(self, latents):
        return latents.permute(1, 0, 2, 3).numpy()


@pytest.fixture(scope="module")
def generation():
    return fixture("tiny_a_generate.safetensors")


@pytest.fixture(scope="module")
def text_encoder(released_model):
    from ctflow.text_encoder import TextEncoder

    return TextEncoder.load(released_model_config().text, released_model)


def fixture_plan(text, **request):
    request = GenerationRequest("fixture", seed=0, steps=200, sampler="euler", shift=1.0, guidance=1.0, **request)
    return GenerationPlan(request, "", "", (), text, torch.ones(1, 1, dtype=torch.bool), Guidance(1.0))


def test_released_mode_reproduces_the_original_three_block_generation(generation, autoencoder, text_encoder):
    pipe = FixtureNoise(released_model_config(), build_released_stdit(TINY_A), autoencoder, text_encoder,
                        draws=generation)
    pieces = list(pipe.stream(fixture_plan(generation["prompt_embeds"])))
    volume = torch.cat([torch.from_numpy(piece.hu) for piece in pieces]).permute(1, 0, 2, 3)
    assert volume.shape == generation["result"][0].shape  # 3 blocks, the init block dropped, nothing trimmed
    assert (volume - generation["result"][0]).abs().max() < VOLUME_TOL
    assert [piece.blocks_done == piece.blocks_expected for piece in pieces] == [False, False, True]  # last


def test_the_white_distance_decides_a_frame_exactly_as_the_released_share_test():
    """export calibrates the tolerance on white_distance and the pipeline tests frames with white_frames: one rule.
    Against the released formula (share of elements closer than the tolerance, more than the fraction), at
    tolerances at and around every frame's deciding distance, where an off-by-one k would differ."""
    rng = np.random.default_rng(0)
    block, white = torch.from_numpy(rng.normal(size=(4, 6, 5, 5))).float(), torch.zeros(4, 5, 5)
    block[:, 2] = 0.01  # a frame all but white
    frame = torch.full((100,), 10.0)
    frame[:90] = 0.0  # 90 of 100 elements white, the rest far: not more than 0.9
    block[:, 3] = frame.reshape(4, 5, 5)
    distances = white_distance(block, white, 0.9)
    for tolerance in [*distances.tolist(), *(distances + 1e-4).tolist(), 0.05, 9.0, 11.0]:
        released = ((block - white[:, None]).abs() < tolerance).float().mean(dim=(0, 2, 3)) > 0.9
        assert white_frames(block, white, tolerance, 0.9).tolist() == released.tolist(), tolerance
    assert white_frames(block, white, 0.05, 0.9).tolist() == [False, False, True, False, False, False]
    assert not white_frames(block, white, 9.0, 0.9)[3]  # where a 0.9 quantile (interpolated) would say white
    assert white_distance(block, white, 1.0).isinf().all()  # no frame is closer than white in more than all of it


def test_the_stop_rule_keeps_white_slices_inside_and_trims_them_at_the_end(generation):
    synthetic, white = generation["stop/synthetic"][0], generation["one_latent_scaled"][0]
    assert white_frames(synthetic, white, 0.1, 0.9)[[12, 0]].tolist() == [True, False]  # near / far from white
    volume_end = VolumeEnd("released", white, 0.1, 0.9)
    trimmed = torch.cat([volume_end.latents(piece, room=48)[0] for piece in (synthetic[:, :16], synthetic[:, 16:])],
                        dim=1)
    assert trimmed.shape[1] == int(generation["stop/trimmed_length"]) == 17
    assert torch.equal(trimmed, synthetic[:, :17])


def test_a_block_starting_white_ends_the_volume_and_is_kept(generation):
    """The released rule: the stop block stays (then its white tail is trimmed); our rule would cut at once."""
    config = released_model_config()
    white = generation["one_latent_scaled"][0]
    block = generation["result"][0, :, :16].clone()

    def cut(rule):  # (frames kept, whether the volume ends after them)
        kept, last = VolumeEnd(rule, white, config.end_tolerance, config.end_fraction).latents(block, room=48)
        return kept.shape[1], last

    assert cut("released")[1] is False
    block[:, 0] = white
    assert cut("released") == (16, True)
    assert cut("ctflow") == (0, True)


def test_guidance_is_refused_for_a_model_without_an_unconditional_branch(autoencoder, text_encoder):
    pipe = CTFlowPipeline(released_model_config(), build_released_stdit(TINY_A), autoencoder, text_encoder)
    with pytest.raises(RequestError, match="trained without text dropout.*use guidance 1"):
        pipe.plan(GenerationRequest("Findings: right pleural effusion.", guidance=3.0))
    assert pipe.plan(GenerationRequest("Findings: right pleural effusion.")).text.shape == (1, 1, 768)


def test_a_precomputed_embedding_is_sampled_unguided_by_default(autoencoder, text_encoder):
    """A one-vector model whose default guidance is 3: a given embedding has no empty-report twin, so without a
    guidance asked for it runs at 1 and says so; asked for, guidance is refused."""
    config = released_model_config()
    config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, guidance=3.0, side_guidance=2.0,
                                                                      finding_guidance=1.5, guidance_supported=True))
    pipe = CTFlowPipeline(config, build_released_stdit(TINY_A), autoencoder, text_encoder)
    vector = torch.ones(768)
    plan = pipe.plan(GenerationRequest("Findings: right nodule.", embedding=vector))
    assert plan.request.guidance == 1.0 and plan.request.side_guidance == 0.0 and plan.guidance.branches == 1
    assert plan.request.finding_guidance == 0.0
    assert len(plan.notices) == 3 and "model's default is 3" in plan.notices[0]
    assert "side guidance 0 (the model's default is 2)" in plan.notices[1]
    assert "finding guidance 0 (the model's default is 1.5)" in plan.notices[2]
    assert pipe.plan(GenerationRequest("Findings: nodule.", embedding=vector, guidance=1.0,
                                       side_guidance=0.0, finding_guidance=0.0)).notices == ()
    with pytest.raises(RequestError, match="with a precomputed embedding use guidance 1"):
        pipe.plan(GenerationRequest("Findings: nodule.", embedding=vector, guidance=3.0))
    with pytest.raises(RequestError, match="with a precomputed embedding use side guidance 0"):
        pipe.plan(GenerationRequest("Findings: nodule.", embedding=vector, side_guidance=2.0))
    with pytest.raises(RequestError, match="to read its findings: with a precomputed embedding use finding guidance 0"):
        pipe.plan(GenerationRequest("Findings: nodule.", embedding=vector, finding_guidance=1.0))
    assert pipe.plan(GenerationRequest("Findings: nodule.")).request.guidance == 3.0  # text: the default


# -- import-released: a normal model folder that `ctflow generate` runs end to end ------------------------------

@pytest.fixture(scope="module")
def sources(released_downloads, released_model):
    """--denoiser, --vae and --text-encoder as a user passes them."""
    return released_downloads.denoiser, released_downloads.vae, released_downloads.root / "ct-clip-text"


def test_import_builds_a_verified_model_folder_with_a_card(released_model):
    from ctflow.model_folder import read_config, verify_model_folder

    listed = verify_model_folder(released_model)
    assert {"model.safetensors", "config.json", "README.md", "vae/config.json", "text_encoder/model.safetensors",
            "text_encoder/tokenizer.json"} <= set(listed)
    config = read_config(released_model)
    assert config.denoiser.variant == "released" and config.sampling.mode == "released"
    assert config.autoencoder.pixel_range == (0.0, 1.0) and config.text.mode == "cls"
    card = (released_model / "README.md").read_text()
    for needed in ("SYNTHETIC", "Licence status", "Inferred", "HU -1000..1000 <-> VAE image 0..1", "sha256"):
        assert needed in card, needed


def test_generate_runs_the_imported_model_to_a_nifti_in_hu(released_model, tmp_path, capsys):
    from ctflow.cli import main
    from ctflow.io import read_volume

    out = tmp_path / "ct.nii.gz"
    assert main(["generate", "--model", str(released_model), "--report", "Findings: right pleural effusion.",
                 "--out", str(out), "--seed", "3", "--steps", "4", "--sampler", "ab2", "--device", "cpu",
                 "--dtype", "float32"]) == 0
    volume = read_volume(out)
    k, j, i = volume.hu.shape
    assert (j, i) == (16, 16) and k % 16 == 0 and k <= 320  # whole blocks until the stop test or 20 blocks
    assert -1000 <= volume.hu.min() and volume.hu.max() <= 1000
    assert volume.geometry.spacing == pytest.approx((1.40625, 1.40625, 1.5))
    assert volume.provenance.model == "ctflow-released-D64" and volume.provenance.sampler == "ab2"


def test_a_precomputed_embedding_stands_in_for_the_report(released_model, tmp_path, capsys):
    import numpy as np

    from ctflow.cli import main
    from ctflow.io import read_volume

    embedding = tmp_path / "report.npy"
    np.save(embedding, np.random.default_rng(0).standard_normal((3, 768)).astype(np.float32))
    out = tmp_path / "ct.nii.gz"
    assert main(["generate", "--model", str(released_model), "--embedding", str(embedding), "--slices", "20",
                 "--out", str(out), "--seed", "1", "--steps", "2", "--device", "cpu"]) == 0
    volume = read_volume(out)
    assert volume.hu.shape == (20, 16, 16) and "precomputed report embedding report.npy" in volume.provenance.report


@pytest.mark.parametrize("key, value, message", [
    ("num_heads", 0, "denoiser.num_heads must be from 1 to 1024, not 0"),
    ("hidden_size", 0, "denoiser.hidden_size must be from 1 to 65536, not 0"),
    ("patch_size", [0, 1, 1], "denoiser.patch_size must be from 1 to 64, not 0"),
    ("mlp_ratio", -1, "denoiser.mlp_ratio must be above 0 and at most 64, not -1"),
    ("mlp_ratio", float("nan"), "denoiser.mlp_ratio must be a finite number, not nan"),
    ("depth", "2", "denoiser.depth must be a whole number, not '2'"),
    ("num_heads", 3, "not divisible"),
])
def test_released_sizes_are_held_to_the_rules_of_a_ctflow_config(tmp_path, key, value, message):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(ModelError, match=re.escape(message)) as raised:
        load_released_denoiser(folder)
    assert str(raised.value).startswith(f"{folder / 'config.json'}: ")


@pytest.mark.parametrize("args, message", [
    (["--guidance", "2"], "trained without text dropout, so it has no unconditional prediction to guide by"),
    (["--embedding", "{narrow}"], r"the embedding is \[1, 384\], but ctflow-released-D64 reads 768-d"),
    (["--embedding", "{pickle}"], "must be .safetensors or .npy"),
    (["--embedding", "{scalar}"], r"the embedding is \[\], but"),
    (["--embedding", "{objects}"], "cannot read the embedding"),
])
def test_bad_generate_inputs_give_one_clear_line(released_model, tmp_path, capsys, args, message):
    import numpy as np

    from ctflow.cli import main

    np.save(tmp_path / "narrow.npy", np.ones((1, 384), np.float32))
    torch.save(torch.ones(768), tmp_path / "embedding.pt")
    np.save(tmp_path / "scalar.npy", np.float32(1.0))
    np.save(tmp_path / "objects.npy", np.array([{"run": "code"}], dtype=object), allow_pickle=True)
    args = [a.format(narrow=tmp_path / "narrow.npy", pickle=tmp_path / "embedding.pt", scalar=tmp_path / "scalar.npy",
                     objects=tmp_path / "objects.npy") for a in args]
    source = [] if "--embedding" in args else ["--report", "Findings: nodule."]
    out = tmp_path / "ct.nii.gz"
    assert main(["generate", "--model", str(released_model), *source, *args, "--out", str(out), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ctflow: error:") and __import__("re").search(message, err[0])
    assert not out.exists()


def write_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> str:
    """A Hugging Face cache holding one snapshot of `repo`, as huggingface_hub lays it out after a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, snapshot / name)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir(parents=True)
    (cache / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text(commit)
    return commit


def test_hub_ids_resolve_subfolders_from_the_cache_and_name_a_missing_one(sources, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from ctflow.released import resolve_source

    denoiser, _, _ = sources
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = write_hub_cache(tmp_path / "hub", "EnyaWoooo/CTFlow", {
        f"checkpoint-680000/denoiser_ema/{p.name}": p for p in denoiser.iterdir()})
    folder, source = resolve_source("EnyaWoooo/CTFlow/checkpoint-680000/denoiser_ema", "--denoiser")
    assert load_released_denoiser(folder).config.hidden_size == 64
    assert source == f"EnyaWoooo/CTFlow/checkpoint-680000/denoiser_ema at commit {commit}"
    with pytest.raises(ModelError, match="has no subfolder 'checkpoint-9/denoiser_ema'"):
        resolve_source("EnyaWoooo/CTFlow/checkpoint-9/denoiser_ema", "--denoiser")
    with pytest.raises(ModelError, match="not in the local model cache"):
        resolve_source("someone/else/vae", "--vae")


@pytest.mark.parametrize("change, message", [
    ("pickle", "holds only pickle weights"),
    ("class", "describes a AutoencoderKL, not a released CTFlow denoiser"),
    ("missing", "--denoiser folder /no/such/denoiser_ema does not exist"),
    ("width", "gives 384-d embeddings, but the denoiser reads 768-d ones"),
    ("pixels", "autoencoder pixel_range must run from low to high"),
    ("pixels inf", "--pixel-range must be a finite number, not inf"),
    ("spacing", "--spacing must be above 0 and at most 1000, not -1.0"),
    ("spacing nan", "--spacing must be a finite number, not nan"),
    ("text pickle", "holds no safetensors weights; make it with `ctflow convert-ct-clip`"),
])
def test_bad_import_inputs_give_one_clear_line(sources, tmp_path, capsys, change, message):
    from ctflow.cli import main

    denoiser, vae, text = sources
    if change in ("pickle", "class"):
        denoiser = Path(shutil.copytree(denoiser, tmp_path / "denoiser_ema"))
    if change == "pickle":
        (denoiser / "diffusion_pytorch_model.safetensors").rename(denoiser / "diffusion_pytorch_model.bin")
    elif change == "class":
        shutil.copy(vae / "config.json", denoiser / "config.json")
    elif change == "missing":
        denoiser = Path("/no/such/denoiser_ema")
    elif change == "text pickle":
        text = Path(shutil.copytree(text, tmp_path / "text"))
        (text / "model.safetensors").rename(text / "pytorch_model.bin")
    elif change == "width":
        text = Path(shutil.copytree(text, tmp_path / "text"))
        config = json.loads((text / "config.json").read_text())
        (text / "config.json").write_text(json.dumps({**config, "hidden_size": 384}))
    out = tmp_path / "model"
    pixels = {"pixels": ["--pixel-range", "1", "0"], "pixels inf": ["--pixel-range", "0", "inf"],
              "spacing": ["--spacing", "-1", "1", "1"], "spacing nan": ["--spacing", "1", "nan", "1"]}.get(change, [])
    assert main(["import-released", "--denoiser", str(denoiser), "--vae", str(vae), "--text-encoder", str(text),
                 "--out", str(out), *pixels]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_the_hu_mapping_check_runs_on_an_imported_model(released_model, tmp_path):
    """bench/released_hu_check.py, for a user with CT-RATE volumes: here one small NIfTI stands in for them."""
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    hu = np.random.default_rng(0).integers(-1000, 400, (24, 24, 20)).astype(np.int16)
    nib.save(nib.Nifti1Image(hu, np.diag([1.5, 1.5, 2.5, 1.0])), str(tmp_path / "ct.nii.gz"))
    script = Path(__file__).parents[2] / "bench" / "released_hu_check.py"
    result = subprocess.run([sys.executable, str(script), "--model", str(released_model), "--ct",
                             str(tmp_path / "ct.nii.gz"), "--seeds", "1", "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| HU")]
    assert len(rows) == 5 and all(float(cell) >= 0 for row in rows for cell in row.strip("| ").split(" | ")[1:])


def test_the_projection_of_a_released_size_runs_on_an_imported_model(released_model, monkeypatch):
    """bench/released_model.py --project (L on a CPU, where running it whole takes hours), on the tiny import."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "bench"))
    import released_model as bench

    pipeline = CTFlowPipeline.from_pretrained(released_model, device="cpu")
    reference, default = bench.project(pipeline, [bench.REFERENCE, bench.DEFAULT], slices=40)
    assert (reference["calls_per_block"], default["calls_per_block"]) == (200, 32)
    blocks = -(-40 // pipeline.config.denoiser.block_slices)
    assert default["slices"] == blocks * pipeline.config.denoiser.block_slices
    assert default["projected_volume_s"] == pytest.approx(blocks * (32 * default["call_s"] + default["decode_block_s"]))


def test_info_describes_the_imported_model(released_model, capsys):
    from ctflow.cli import main

    assert main(["info", "--model", str(released_model), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Licence status" in out and '"text_encoder": "folder:text_encoder"' in out


def test_a_token_sequence_model_refuses_a_single_embedding_vector(tiny_pipeline):
    with pytest.raises(RequestError, match="reads token sequences, not one precomputed embedding vector"):
        tiny_pipeline.plan(GenerationRequest("Findings: nodule.", embedding=torch.ones(384)))


def test_the_text_tower_conversion_never_replaces_a_folder_of_other_files(tmp_path):
    from ctflow.ct_clip import convert_ct_clip_text

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="is not a text-encoder folder"):
        convert_ct_clip_text(tmp_path / "ct_clip.pt", tmp_path / "tokenizer", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
