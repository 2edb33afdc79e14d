"""The latent store: every slice latent and prompt embedding of a prepared dataset, encoded once, one file a volume.

    ctflow-train cache-latents --data cache/cohort --vae cache/vae16/vae --out cache/latents16
    torchrun --nproc_per_node 8 -m ctflow_train.cli cache-latents --data data/ctrate --vae runs/vae/vae \\
        --out runs/latents

Layout of a store folder:
  store.json                  what made it: VAE folder and weights hash, text encoder, dtype, latent shape
  common.safetensors          the start and end latents and the embedding of "" (float32)
  volumes/<name>.safetensors  "latents" [S, C, h, w] (white end slices included) and the prompt embeddings
                              "text/plain", "text/length" [M, D], in the store's dtype (float16 or bfloat16), and
                              with --variants K "text/plain/k", "text/length/k" for k < K: the report's variants
  rows/<name>.json            the volume's index row, written after its file: slices, spacing, bytes, sha256
  index.jsonl                 every row, merged, sorted by name: what a reader reads

Flow training never runs the VAE or the text encoder, and reads a store lazily: the index at start (a hundred
bytes a volume), then for each sample only its window of slices from a memory-mapped volume file, so memory does not
grow with the store. Encoding is shared out over torchrun ranks as `ctflow batch` does: ranks share nothing but the
folder, each encodes every world-th volume not yet finished, on its own GPU, and whichever rank finds every row
present merges the index. A rerun resumes where a run stopped; a rerun over more data adds to the store; a store
made with another VAE or text encoder is refused (its start latent or empty-text embedding differs).

Prompts are rendered by ctflow's own render_prompt, as the pipeline does: with "Spacing: <z> mm" always, and once
without and once with "Length: N slices" (N = the patient's real slices, so that asking for N places the end after N
slices). "" is stored too: the pipeline's unconditional branch embeds the empty string. A cohort's store may also hold
K variants of each report (paraphrase.py: the same findings in other words, the same K for every twin of a patient),
which `flow --variant-p` trains on.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from ctflow.autoencoder import SliceAutoencoder
from ctflow.batch import shard
from ctflow.config import DenoiserConfig, TextConfig
from ctflow.errors import CTFlowError
from ctflow.io import atomic_write
from ctflow.checksums import sha256_file
from ctflow.conventions import END_HU, START_HU
from ctflow.report import Report, render_prompt
from ctflow.text_encoder import TextEncoder

from .dataset import read_index
from .options import add_holdout_option, add_size_option, count
from .paraphrase import paraphrase, variant_rng
from .runtime import load_vae, start_processes
from .training_data import list_cases, load_case

FORMAT = "ctflow-latent-store/1"
HEADER, COMMON, INDEX, VOLUMES, ROWS = "store.json", "common.safetensors", "index.jsonl", "volumes", "rows"
PROMPTS = ("plain", "length")  # without / with "Length: N slices"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
ENCODING_TOLERANCE = 1e-2  # one encoder run with other thread counts moves the start latent by ~1e-3; another VAE by ~1


def same_encoding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two encodings of one input (the start slice, a text) come from the same encoder; relative to the
    value too, as a volume file's half precision rounds a token embedding by up to 5e-4 of it."""
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=ENCODING_TOLERANCE,
                                                 atol=ENCODING_TOLERANCE)


class LatentStore:
    """A store folder opened for reading: its index in memory, latents and prompt embeddings read on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.is_file():
            raise CTFlowError(f"{folder} is a single-file latent cache of an earlier ctflow-train: encode the data "
                              "again into a store folder (ctflow-train cache-latents --out FOLDER)")
        if not (self.folder / HEADER).is_file():
            raise CTFlowError(f"{folder} is not a latent store (no {HEADER}): make one with ctflow-train cache-latents")
        self.header = json.loads((self.folder / HEADER).read_text(encoding="utf-8"))
        if self.header.get("format") != FORMAT:
            found = self.header.get("format")
            raise CTFlowError(f"{folder} is a latent store of another format ({found}), not {FORMAT}")
        if not (self.folder / INDEX).is_file():
            raise CTFlowError(f"{folder} has no {INDEX}: its encoding stopped before the end; run cache-latents again")
        common = load_file(self.folder / COMMON)
        self.start, self.end, self.empty = common["start"], common["end"], common["text/empty"]
        rows = [json.loads(line) for line in (self.folder / INDEX).read_text(encoding="utf-8").splitlines()
                if line.strip()]
        if not rows:
            raise CTFlowError(f"{folder} holds no volumes")
        self.names = [row["name"] for row in rows]
        self.slices = [row["slices"] for row in rows]  # all slices, white end slices included
        self.content_slices = content = [row["content_slices"] for row in rows]  # real slices, before the white ones
        self.sources = [row.get("source") for row in rows]  # the prepared folder each volume was encoded from
        self.volume_sha256 = [row.get("sha256") for row in rows]  # each volume's file: what its latents are
        self.variants = int(self.header.get("variants", 0))  # report variants a volume holds besides its report
        self.meta = {
            "names": self.names,
            "content_slices": content,
            "median_content_slices": int(statistics.median(content)),
            "spacing": [statistics.median(row["spacing"][axis] for row in rows) for axis in range(3)],
            **{key: self.header[key] for key in ("image_size", "vae", "text", "dtype")},
        }

    def __len__(self) -> int:
        return len(self.names)

    @property
    def fingerprint(self) -> str:
        """What the store holds, volume by volume: a flow run resumed on a store made again from other data is
        refused."""
        held = "".join(f"{name} {sha}\n" for name, sha in zip(self.names, self.volume_sha256))
        return hashlib.sha256(held.encode()).hexdigest()

    def _file(self, volume: int) -> str:
        return str(self.folder / VOLUMES / f"{self.names[volume]}.safetensors")

    def window(self, volume: int, first: int, stop: int) -> torch.Tensor:
        """float32 [stop - first, C, h, w]: slices first..stop-1 of one volume, read from its memory-mapped file."""
        with safe_open(self._file(volume), framework="pt") as handle:
            return handle.get_slice("latents")[first:stop].float()

    def latents(self, volume: int) -> torch.Tensor:
        """float32 [S, C, h, w]: a whole volume."""
        return self.window(volume, 0, self.slices[volume])

    def text(self, kind: str, volume: int, variant: int | None = None) -> torch.Tensor:
        """float32 [M, D]: the token embeddings of one of the volume's prompts (PROMPTS), of its report or of
        report variant `variant`."""
        key = f"text/{kind}" if variant is None else f"text/{kind}/{variant}"
        with safe_open(self._file(volume), framework="pt") as handle:
            return handle.get_tensor(key).float()


def open_stores(paths: list[str | Path]) -> list[LatentStore]:
    """Several stores to train on as one (a cohort and its twins, say): all from the same VAE and text encoder."""
    stores = [LatentStore(path) for path in paths]
    for path, store in zip(paths[1:], stores[1:]):
        if not (same_encoding(store.start, stores[0].start) and same_encoding(store.empty, stores[0].empty)):
            raise CTFlowError(f"{path} was encoded with another VAE or text encoder than {paths[0]}: re-encode it")
    return stores


def verify(folder: str | Path) -> list[str]:
    """Names of the volumes whose file is missing or no longer matches its checksum (empty: the store is whole)."""
    store = LatentStore(folder)
    rows = [json.loads(line) for line in (store.folder / INDEX).read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return [row["name"] for row in rows
            if not (store.folder / row["file"]).is_file() or sha256_file(store.folder / row["file"]) != row["sha256"]]


class StoreWriter:
    """Adds volumes to a store folder (a new one, or one to resume or extend): safe to run on many ranks at once."""

    def __init__(self, folder: str | Path, header: dict, common: dict[str, torch.Tensor]) -> None:
        self.folder = Path(folder)
        self.dtype = DTYPES[header["dtype"]]
        if (self.folder / HEADER).is_file():
            self._check(header, common)
        else:
            for sub in (VOLUMES, ROWS):
                (self.folder / sub).mkdir(parents=True, exist_ok=True)
            tensors = {k: v.float().contiguous() for k, v in common.items()}
            atomic_write(self.folder / COMMON, lambda tmp: save_file(tensors, tmp), overwrite=True)
            text = json.dumps(header, indent=1) + "\n"
            atomic_write(self.folder / HEADER, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)

    def _check(self, header: dict, common: dict[str, torch.Tensor]) -> None:
        """Adding to an existing store: the same encoders, dtype and slice size, or nothing is written."""
        existing = json.loads((self.folder / HEADER).read_text(encoding="utf-8"))
        if existing.get("format") != FORMAT:
            raise CTFlowError(f"{self.folder} is not a latent store of format {FORMAT}")
        for key in ("dtype", "image_size", "latent_shape", "variants"):
            if existing.get(key, 0) != header.get(key, 0):
                raise CTFlowError(f"{self.folder} holds {key} {existing.get(key, 0)}, not {header.get(key, 0)}: "
                                  "use another --out")
        stored = load_file(self.folder / COMMON)
        if not all(same_encoding(stored[key], common[key]) for key in ("start", "text/empty")):
            raise CTFlowError(f"{self.folder} was encoded with another VAE or text encoder: use another --out")

    def _row(self, name: str) -> Path:
        return self.folder / ROWS / f"{name}.json"

    def finished(self, name: str) -> bool:
        """A volume is finished when its file and its row exist (the row is written last)."""
        return self._row(name).is_file() and (self.folder / VOLUMES / f"{name}.safetensors").is_file()

    def add(self, name: str, latents: torch.Tensor, text: dict[str, torch.Tensor], content_slices: int,
            spacing: tuple[float, float, float], source: str) -> dict:
        """Write one volume's file, then its row; both atomically. Returns the row."""
        if Path(name).name != name or name.startswith("."):
            raise CTFlowError(f"volume name {name!r} cannot name a file")
        tensors = {"latents": latents, **{f"text/{key}": tokens for key, tokens in text.items()}}
        data = save({k: v.to(self.dtype).contiguous() for k, v in tensors.items()})
        file = f"{VOLUMES}/{name}.safetensors"
        atomic_write(self.folder / file, lambda tmp: tmp.write_bytes(data), overwrite=True)
        row = {"name": name, "file": file, "slices": len(latents), "content_slices": content_slices,
               "spacing": list(spacing), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
               "source": source}
        atomic_write(self._row(name), lambda tmp: tmp.write_text(json.dumps(row) + "\n", encoding="utf-8"),
                     overwrite=True)
        return row

    def merge(self) -> int:
        """Write index.jsonl from every row present (the same content whichever rank writes it); returns the count."""
        rows = sorted((json.loads(path.read_text(encoding="utf-8")) for path in (self.folder / ROWS).glob("*.json")),
                      key=lambda row: row["name"])
        lines = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(self.folder / INDEX, lambda tmp: tmp.write_text(lines, encoding="utf-8"), overwrite=True)
        return len(rows)


def encode_volume(autoencoder: SliceAutoencoder, case) -> torch.Tensor:
    """[S, C, h, w] latents; the identical white end slices reuse one encoding (a sixth of the work)."""
    content = autoencoder.encode(torch.from_numpy(case.hu[: case.content_slices]))
    white = autoencoder.constant_latent(END_HU)[None].expand(len(case.hu) - case.content_slices, -1, -1, -1)
    return torch.cat([content, white]).cpu()


def embed(encoder: TextEncoder, text: str) -> torch.Tensor:
    """[M, D] token embeddings of one text, padding removed."""
    embedding = encoder.encode([text])
    return embedding.tokens[0][embedding.mask[0]].cpu()


def store_prompt(report: Report, spacing: float, slices: int | None = None) -> str:
    """The prompt a store holds for a volume's report (and tune-text's student reads): the report, its length or
    not, and its slice spacing, as the pipeline's prompt states them."""
    return render_prompt(report, slices, spacing)


def labelled_findings(data: Path, entry: dict) -> list[dict]:
    """The findings of a prepared case's label file (written by ctflow-train cohort): what its variants say."""
    return json.loads((Path(data) / entry["labels"]).read_text(encoding="utf-8"))["findings"]


def report_variant(findings: list[dict], name: str, number: int) -> Report:
    """Variant `number` of a volume's report: its findings in other words, the same wherever it is drawn."""
    return paraphrase(findings, variant_rng(name, number))


def prompts_of(data: Path, entry: dict, case, variants: int) -> dict[str, str]:
    """The prompts a volume's file holds: its report without and with its length, and as many report variants."""
    reports = {"": case.report}
    if variants:
        findings = labelled_findings(data, entry)
        reports.update({f"/{k}": report_variant(findings, case.name, k) for k in range(variants)})
    lengths = {"plain": None, "length": case.content_slices}
    return {f"{kind}{suffix}": store_prompt(report, case.spacing[2], lengths[kind])
            for suffix, report in reports.items() for kind in PROMPTS}


class Prompts:
    """Per volume of the stores (numbered over all of them, as flow_data does): its prompts made again from the
    prepared folder it was encoded from, by the store's own rule (store_prompt), as a store keeps their embeddings
    alone. `variants`: the report variants too, which need the cohort's findings (labels/); `code`: the denoiser
    whose codes code_of reads (DenoiserConfig.read_code)."""

    def __init__(self, stores, variants: bool = True, code: DenoiserConfig | None = None) -> None:
        self.code = code
        self.writer, self.findings, self.spacing = [], [], []
        entries: dict[str, dict[str, dict]] = {}
        for store in stores:
            for volume, name in enumerate(store.names):
                source = Path(store.sources[volume] or "")
                if str(source) not in entries:
                    entries[str(source)] = {entry["name"]: entry for entry in read_index(source)}
                entry = entries[str(source)].get(name)
                if entry is None:
                    raise CTFlowError(f"{name} of {store.folder} is not in {source}, the folder it was encoded from: "
                                      "was that folder made again? Encode it again (cache-latents)")
                if variants and not entry.get("labels"):
                    raise CTFlowError(f"{name} of {store.folder} has no labels in {source}: report variants are "
                                      "written from a cohort's findings (ctflow-train cohort)")
                self.writer.append(Report(findings=entry["findings"], impressions=entry["impressions"]))
                self.findings.append((name, labelled_findings(source, entry) if variants else []))
                self.spacing.append(float(entry["spacing"][2]))
        self._codes: dict[tuple, torch.Tensor] = {}

    def writer_prompt(self, number: int) -> str:
        return store_prompt(self.writer[number], self.spacing[number])

    def variant_prompt(self, number: int, variant: int) -> str:
        name, findings = self.findings[number]
        return store_prompt(report_variant(findings, name, variant), self.spacing[number])

    def code_of(self, number: int, variant: int | None = None, first_slice: int = 0) -> torch.Tensor:
        """[code.code_size] the code `code` reads of the volume's report or of its variant for the block starting at
        `first_slice` (a prompt's length line names no side: the same for both of PROMPTS)."""
        key = (number, variant, self.code.code_levels(first_slice))
        if key not in self._codes:
            text = self.writer_prompt(number) if variant is None else self.variant_prompt(number, variant)
            self._codes[key] = torch.tensor(self.code.read_code(text, first_slice))
        return self._codes[key]


def check_sources(stores, prompts: Prompts, encoder: TextEncoder) -> None:
    """Refuse a cohort that is no longer the one a store embedded (made again, or another of the same names): the
    prompts made again from it would not be the store's. Checked on each store's first volume."""
    number = 0
    for store in stores:
        if store.names and not same_encoding(embed(encoder, prompts.writer_prompt(number)),
                                             store.text("plain", 0)):
            raise CTFlowError(f"{store.names[0]}'s report in {store.sources[0]} is not the one {store.folder} "
                              "embedded: the cohort was made again after the store; encode it again (cache-latents)")
        number += len(store.names)


def build_store(data: Path, vae_folder: Path, out: Path, holdout: int, size: int, text: TextConfig, limit: int = 0,
                dtype: str = "float16", variants: int = 0, log=print) -> dict:
    """Encode this rank's share of the prepared folder's training cases into the store `out`; merge the index when
    every case is there. Finished volumes are skipped, so a rerun resumes and a rerun over more data adds."""
    processes = start_processes(join_group=False)  # ranks share nothing but the folder
    rank, world, device = processes.rank, processes.world, processes.device
    entries, _ = list_cases(data, holdout, limit)
    if variants and not all(entry.get("labels") for entry in entries):
        raise CTFlowError(f"--variants needs the findings of every case (labels/, written by ctflow-train cohort); "
                          f"{data} has cases without")
    if entries:  # before the store's header is written: a store of the wrong size could not be resumed
        rows, columns = load_case(data, entries[0]).hu.shape[1:]
        if (rows, columns) != (size, size):
            raise CTFlowError(f"{data} holds {rows}x{columns} slices, not --size {size}: give --size {rows}")
    autoencoder = load_vae(vae_folder, size, device)
    encoder = TextEncoder.load(text)
    encoder.model.to(device)
    common = {"start": autoencoder.constant_latent(START_HU).cpu(), "end": autoencoder.constant_latent(END_HU).cpu(),
              "text/empty": embed(encoder, "")}
    weights = Path(vae_folder) / "diffusion_pytorch_model.safetensors"
    header = {"format": FORMAT, "dtype": dtype, "image_size": size, "latent_shape": list(common["start"].shape),
              "text_dim": int(common["text/empty"].shape[-1]), "vae": str(vae_folder), "variants": variants,
              "vae_sha256": sha256_file(weights) if weights.is_file() else None, "text": dataclasses.asdict(text)}
    writer = StoreWriter(out, header, common)
    mine = [entry for entry in shard(entries, rank, world) if not writer.finished(entry["name"])]
    started = time.perf_counter()
    for number, entry in enumerate(mine):
        case = load_case(data, entry)
        prompts = prompts_of(data, entry, case, variants)
        tokens = {kind: embed(encoder, prompt) for kind, prompt in prompts.items()}
        writer.add(case.name, encode_volume(autoencoder, case), tokens, case.content_slices, case.spacing,
                   str(Path(data).resolve()))
        log(f"rank {rank}: {number + 1}/{len(mine)} {case.name}: {len(case.hu)} slices, "
            f"{time.perf_counter() - started:.0f} s")
    complete = all(writer.finished(entry["name"]) for entry in entries)
    volumes = writer.merge() if complete else None
    return {"rank": rank, "world": world, "encoded": len(mine), "volumes": volumes, "complete": complete,
            "encode_seconds": round(time.perf_counter() - started, 1)}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="prepared folder (cohort / prepare-ctrate)")
    parser.add_argument("--vae", type=Path, required=True, help="trained VAE folder (ctflow-train vae --out X: X/vae)")
    parser.add_argument("--out", type=Path, required=True,
                        help="store folder: created, or resumed / extended when it holds a store of the same encoders")
    add_holdout_option(parser)
    parser.add_argument("--limit", type=count, default=0,
                        help="use only the first N training patients, with every volume of theirs (0: all)")
    add_size_option(parser)
    parser.add_argument("--text-source", default=TextConfig.source, help="text encoder (see ctflow TextConfig.source)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                        help="storage type of latents and embeddings (float16: finer steps; bfloat16: wider range)")
    parser.add_argument("--variants", type=count, default=0,
                        help="also embed K variants of each report (the same findings in other words; a cohort's "
                             "labels needed), for flow --variant-p")


def configure_verify(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", type=Path, help="latent store folder")


def run_verify(args: argparse.Namespace) -> int:
    bad = verify(args.store)
    if bad:
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise CTFlowError(f"{len(bad)} volume(s) of {args.store} missing or changed ({names}): "
                          "delete their rows/<name>.json and run cache-latents again")
    print(json.dumps({"store": str(args.store), "volumes": len(LatentStore(args.store)), "verified": True}))
    return 0


def run(args: argparse.Namespace) -> int:
    if not (args.vae / "config.json").is_file():
        raise CTFlowError(f"--vae {args.vae} is not a VAE folder (no config.json): "
                          "give the vae/ of a `ctflow-train vae` run")
    summary = build_store(args.data, args.vae, args.out, args.holdout, args.size, TextConfig(source=args.text_source),
                          args.limit, args.dtype, args.variants)
    print(json.dumps(summary))
    return 0
