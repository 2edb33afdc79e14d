"""The published CTFlow model's cost, at its real size, with random weights in its released layout.

Writes what a user downloads (a denoiser folder in the released layout, a FLUX.1-size VAE, a CT-CLIP-layout text
checkpoint) with random weights, imports them with `ctflow import-released`, loads the model folder, then runs the
original's sampler (Euler, 200 steps) and this project's default (ab2, 32 steps) side by side: import and load
time, time to the first block, whole volume, peak memory. Random weights never draw the end marker, so the volume
length is set (--slices; 208 = 13 blocks, about the 201 frames the original writes). Not a test.

    python bench/released_model.py --device cuda --dtype float32 --slices 208    # measured (see released_model_gpu.sh)
    python bench/released_model.py --project --threads 2                        # this CPU: projected, < 1 min of L

--project times one denoiser call and the decode of one slice, and multiplies them out (running L here would
take hours).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

import ctflow
from ctflow.autoencoder import VAE_PRESETS
from ctflow.denoiser import STDiT, parameter_count
from ctflow.devices import select_device
from ctflow.released import import_released, save_released_layout
from ctflow.sampling import block_velocity, denoiser_codes
from ctflow_train.options import positive

sys.path.insert(0, str(Path(__file__).parent))
from generation import (  # noqa: E402
    DTYPES, REFERENCE, PeakMemory, add_results_options, describe_device, markdown, model_calls, parse_setting,
    run_bench, run_setting, synchronize, write_json,
)

DEFAULT = "default=ab2:32:1"  # this project's default sampler (SamplingConfig)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "findings", "impressions", "normal", "chest", "ct", ".", ":"]


def write_random_release(folder: Path, size: str) -> tuple[Path, Path, Path, int]:
    """Random-weight downloads in the released layouts: denoiser folder, FLUX-size VAE folder, text-encoder folder."""
    from diffusers import AutoencoderKL
    from transformers import BertConfig, BertModel

    from ctflow.ct_clip import convert_ct_clip_text

    torch.manual_seed(0)
    denoiser = STDiT(dataclasses.replace(ctflow.DENOISER_PRESETS[size], variant="released"))
    with torch.no_grad():  # no zero output layers: every path computes as in a trained model
        for parameter in denoiser.parameters():
            if parameter.dim() > 1 and not parameter.abs().sum():
                parameter.normal_(0, 0.02)
    parameters = parameter_count(denoiser)
    save_released_layout(denoiser, folder / "denoiser_ema")
    del denoiser
    AutoencoderKL(**VAE_PRESETS["flux"]).save_pretrained(folder / "vae", safe_serialization=True)
    # One BERT layer of CXR-BERT's width: encoding the report is a one-off, far below a block's cost.
    bert = BertModel(BertConfig(vocab_size=len(VOCAB), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                intermediate_size=3072, max_position_embeddings=512))
    torch.save({f"text_transformer.{k}": v for k, v in bert.state_dict().items()}, folder / "ct_clip.pt")
    (folder / "cxr_bert").mkdir()
    (folder / "cxr_bert" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    text = convert_ct_clip_text(folder / "ct_clip.pt", folder / "cxr_bert", folder / "text_encoder")
    return folder / "denoiser_ema", folder / "vae", text, parameters


def project(pipeline, settings: list[str], slices: int) -> list[dict]:
    """One denoiser call and one slice decode (no warm-up, no repeats: L on a CPU), multiplied out."""
    config = pipeline.config.denoiser
    latent = pipeline.autoencoder.constant_latent(-1000.0)
    block = latent[:, None].expand(-1, config.block_slices, -1, -1)[None].to(pipeline.device)
    started = time.perf_counter()
    pipeline._decode(block[0, :, :1])
    decode_s = (time.perf_counter() - started) * config.block_slices
    plan = pipeline.plan(ctflow.GenerationRequest("Findings: normal chest CT.", seed=0))
    velocity = block_velocity(pipeline.denoiser, block, plan.text, plan.text_mask, 0, plan.guidance,
                              denoiser_codes(plan.code_texts, config, 0))
    with torch.no_grad():
        started = time.perf_counter()
        velocity(block, torch.tensor(0.5, device=pipeline.device))
        call_s = time.perf_counter() - started
    blocks = -(-slices // config.block_slices)
    rows = []
    for text in settings:
        name, options, _ = parse_setting(text)
        calls = model_calls(options["sampler"], options["steps"], options["guidance"])
        block_s = calls * call_s + decode_s
        rows.append({"setting": name, "sampler": options["sampler"], "steps": options["steps"],
                     "calls_per_block": calls,
                     "call_s": call_s, "decode_block_s": decode_s, "projected_first_block_s": block_s,
                     "projected_volume_s": blocks * block_s, "slices": blocks * config.block_slices})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("S", "B", "L"), default="L", help="the paper's model size (released: L)")
    parser.add_argument("--slices", type=positive(int), default=208,
                        help="volume length (random weights never end a volume)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="float32: as the original runs")
    parser.add_argument("--threads", type=positive(int), help="torch CPU threads")
    parser.add_argument("--no-reference", action="store_true", help="skip the original's Euler 200")
    parser.add_argument("--project", action="store_true", help="project from one call and one slice decode")
    parser.add_argument("--scratch", type=Path, help="folder for the random downloads (default: a temporary one)")
    add_results_options(parser)
    run_bench("released_model", run, parser.parse_args())


def run(args: argparse.Namespace) -> None:
    settings = ([] if args.no_reference else [REFERENCE]) + [DEFAULT]
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        started = time.perf_counter()
        denoiser, vae, text, parameters = write_random_release(Path(scratch), args.size)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        model = import_released(str(denoiser), str(vae), text, Path(scratch) / "model")
        import_s = time.perf_counter() - started
        device = select_device(args.device)
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            pipeline = ctflow.CTFlowPipeline.from_pretrained(model, device=args.device, dtype=DTYPES[args.dtype])
            synchronize(pipeline.device)
            load_s = time.perf_counter() - started
    facts = {"device": describe_device(pipeline), "size": args.size, "denoiser_parameters": parameters,
             "torch": torch.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
             "write_random_downloads_s": round(write_s, 1), "import_s": round(import_s, 1),
             "load_s": round(load_s, 1), "load_peak_memory_mb": memory.mb, "date": datetime.date.today().isoformat()}
    rows: list[dict] = []

    def report(kind: str) -> None:  # after every setting: a run cut short by a timeout still leaves its rows
        write_json(args.json, {**facts, "kind": kind, "results": rows}, overwrite=True)  # checked at the start

    if args.project:
        rows += project(pipeline, settings, args.slices)
        kind = "projected from one call and one slice decode"
    else:
        kind = "measured"
        run_setting(pipeline, {"steps": 2}, False, pipeline.config.denoiser.block_slices, 0)  # warm-up
        for text in settings:
            name, options, _ = parse_setting(text)
            timing, _ = run_setting(pipeline, options, False, args.slices, 0)
            rows.append({"setting": name, **timing})
            print(f"  {name}: {timing['total_s']:.1f} s", file=sys.stderr, flush=True)
            report(kind)
    report(kind)
    print(markdown(rows, "; ".join(f"{key} {value}" for key, value in {**facts, "kind": kind}.items())))

if __name__ == "__main__":
    sys.exit(main())
