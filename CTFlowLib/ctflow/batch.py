"""Many volumes from a table of reports: one per (report, seed), resumable, and shared out over torchrun ranks.

Layout of an output folder:
  <id>_s<seed>.nii.gz            the volumes (or .nrrd, or <id>_s<seed>.dcm/ DICOM series folders)
  .manifest/batch.json           the settings the batch was started with; a resume must use the same
  .manifest/items/<id>_s<seed>.json  one manifest row per finished item, written atomically after its volume
  manifest.csv, manifest.json    all rows merged, in table order

An item is finished when its volume and its row both exist. A resume skips finished items and never
rewrites their files; a volume without a row (the run stopped between the two writes) is made again.
Ranks share nothing but this folder, so no process group is needed: each rank takes every
world-th item, and whichever rank finds every row present writes the merged manifest (the content is
the same whoever writes it). `merge_manifest` writes it from whatever rows exist, at any time.

As DICOM, each item is one series, and the series of one report form one study of one fictitious patient (a
teaching set shows a finding's variations side by side); the study UID is derived from the report id and a
random batch UUID in .manifest/dicom.json, so every rank derives the same one.

The VLM3D text-to-CT challenge's input, a .json array of {"input_image_name", "report"}, is a reports table
too: each volume is then named <input_image_name>.nii.gz (without a volume suffix the name may carry), one seed.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .errors import CTFlowError
from .io import DICOM, DICOM_SUFFIX, atomic_write, write_volume
from .model_folder import sha256_file
from .pipeline import CancelFlag, CTFlowPipeline, GenerationRequest
from .report import Report

MANIFEST_DIR, ITEMS_DIR, SETTINGS, DICOM_STUDIES = ".manifest", "items", "batch.json", "dicom.json"
MANIFEST_CSV, MANIFEST_JSON = "manifest.csv", "manifest.json"
COLUMNS = ("file", "report_id", "report", "seed", "slices", "slices_requested", "block_slices", "model",
           "model_sha256", "sha256", "time_s", "steps", "sampler", "guidance", "shift", "device", "rank")
ID_KEYS = ("id", "name", "VolumeName")
CHALLENGE_NAME = "input_image_name"  # VLM3D text-to-CT challenge: the output file's name
CHALLENGE_SUFFIXES = (".mha", ".nii.gz", ".nii", ".nrrd")
SECTION_KEYS = (("findings", "impressions"), ("Findings_EN", "Impressions_EN"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class ReportRow:
    """One row of the reports table: an id that names its files, the report text, an optional exact length."""

    id: str
    text: str
    slices: int | None = None
    order: int = 0
    named: bool = False  # the id is the whole file name (the challenge's input_image_name), no seed suffix


@dataclass(frozen=True)
class Item:
    report: ReportRow
    seed: int

    @property
    def name(self) -> str:
        return self.report.id if self.report.named else f"{self.report.id}_s{self.seed}"


@dataclass
class BatchResult:
    made: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # item name -> error message
    merged: bool = False


def read_table(path: str | os.PathLike) -> list[dict]:
    """Rows of a .csv (header line), .jsonl (one JSON object a line) or .json (an array of objects) file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise CTFlowError(f"{path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise CTFlowError(f"{path} is not UTF-8 text") from exc
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix == ".jsonl":
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise CTFlowError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from exc
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CTFlowError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from exc
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise CTFlowError(f"{path} must hold a JSON array of objects")
        return rows
    raise CTFlowError(f"unsupported table {path.name!r}: use .csv, .jsonl or .json")


def read_reports(path: str | os.PathLike) -> list[ReportRow]:
    """The reports of a table. Text comes from a `report` column, or from Findings/Impressions columns (as in
    CT-RATE's reports CSV and the training cohort's index.jsonl); the id from id/name/VolumeName (else the row
    number); an optional `slices` column asks for an exact length."""
    rows = read_table(path)
    if not rows:
        raise CTFlowError(f"{path} holds no reports")
    reports = [_report_row(row, order) for order, row in enumerate(rows)]
    seen: dict[str, int] = {}
    for report in reports:
        if report.id in seen:
            raise CTFlowError(f"{path}: rows {seen[report.id] + 1} and {report.order + 1} have the same id {report.id!r}")
        seen[report.id] = report.order
    return reports


def _report_row(row: dict, order: int) -> ReportRow:
    text = row.get("report")
    if not text:
        for findings, impressions in SECTION_KEYS:
            if row.get(findings) or row.get(impressions):
                text = Report(str(row.get(findings) or ""), str(row.get(impressions) or "")).text
                break
    if not text:
        raise CTFlowError(f"row {order + 1} has no report text (columns report, or findings/impressions)")
    slices = row.get("slices")
    slices = int(slices) if slices not in (None, "") else None
    if row.get(CHALLENGE_NAME):
        return ReportRow(safe_id(challenge_stem(str(row[CHALLENGE_NAME]))), str(text), slices, order, named=True)
    raw_id = next((str(row[key]) for key in ID_KEYS if row.get(key) not in (None, "")), f"r{order:05d}")
    return ReportRow(safe_id(raw_id), str(text), slices, order)


def challenge_stem(name: str) -> str:
    """input_image_name without the volume suffix it may carry ("65f4...ed.mha" -> "65f4...ed")."""
    base = Path(name).name
    suffix = next((s for s in CHALLENGE_SUFFIXES if base.lower().endswith(s)), "")
    return base[: len(base) - len(suffix)]


def safe_id(raw: str) -> str:
    """A report id usable in file names on every system (the labels of a metrics run are matched the same way)."""
    return _UNSAFE.sub("_", raw)


def plan_items(reports: Iterable[ReportRow], seeds: int, first_seed: int = 0) -> list[Item]:
    """Every (report, seed) pair in table order; the seeds are first_seed ... first_seed + seeds - 1."""
    if seeds < 1:
        raise CTFlowError(f"--seeds must be at least 1, not {seeds}")
    reports = list(reports)
    if seeds > 1 and any(report.named for report in reports):
        raise CTFlowError(f"{CHALLENGE_NAME} names one volume per report: use --seeds 1")
    return [Item(report, first_seed + k) for report in reports for k in range(seeds)]


def rank_and_world() -> tuple[int, int, int | None]:
    """(rank, world size, local rank) from the variables torchrun sets; (0, 1, None) for a plain process."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = os.environ.get("LOCAL_RANK")
    if not 0 <= rank < world:
        raise CTFlowError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return rank, world, int(local) if local is not None else None


def shard(items: list[Item], rank: int, world: int) -> list[Item]:
    """This rank's share: every world-th item, so long and short reports spread evenly."""
    return items[rank::world]


class BatchFolder:
    """The output folder: where each item's volume and row go, and which items are finished."""

    def __init__(self, folder: str | os.PathLike, format: str = ".nii.gz") -> None:
        self.folder = Path(folder)
        self.format = format
        self.suffix = DICOM_SUFFIX if format == DICOM else format
        self.items = self.folder / MANIFEST_DIR / ITEMS_DIR

    def create(self) -> None:
        self.items.mkdir(parents=True, exist_ok=True)

    def volume(self, item: Item) -> Path:
        return self.folder / f"{item.name}{self.suffix}"

    def row(self, item: Item) -> Path:
        return self.items / f"{item.name}.json"

    def finished(self, item: Item) -> bool:
        return self.volume(item).exists() and self.row(item).is_file()

    def write(self, item: Item, volume) -> Path:
        """The item's volume; replaces only an unfinished leftover (a DICOM one only if it is a series folder)."""
        if self.format != DICOM:
            return write_volume(volume, self.volume(item), overwrite=True)
        from .dicom import write_dicom

        return write_dicom(volume, self.volume(item), overwrite=True, study=self.study(item.report),
                           series_number=item.seed + 1 if 0 <= item.seed < 2**31 - 1 else 1)

    def study(self, report: ReportRow):
        """The DICOM study of a report: the same for all its seeds, on every rank, and unique to this batch."""
        from .dicom import NOT_FOR_DIAGNOSIS, Study, derived_uid

        path = self.folder / MANIFEST_DIR / DICOM_STUDIES
        claim = {"namespace": str(uuid.uuid4()), "created": dt.datetime.now(dt.timezone.utc).isoformat()}
        try:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(claim) + "\n"))
        except FileExistsError:
            claim = json.loads(path.read_text())
        return Study(derived_uid(claim["namespace"], report.id), f"report {report.id} - {NOT_FOR_DIAGNOSIS}",
                     dt.datetime.fromisoformat(claim["created"]))

    def claim_settings(self, settings: dict) -> None:
        """Record the batch settings, or check that a resumed batch uses the ones it was started with."""
        path = self.folder / MANIFEST_DIR / SETTINGS
        try:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n"))
        except FileExistsError:
            started = json.loads(path.read_text())
            changed = sorted(key for key in settings.keys() | started.keys() if settings.get(key) != started.get(key))
            if changed:
                raise CTFlowError(
                    f"{self.folder} holds a batch made with other settings ({', '.join(changed)}); "
                    "resume it with the same options or choose a new --out folder"
                ) from None

    def rows(self) -> list[dict]:
        return [json.loads(path.read_text()) for path in sorted(self.items.glob("*.json"))]


def batch_settings(pipeline: CTFlowPipeline, request: GenerationRequest, suffix: str) -> dict:
    """What must not change between a batch and its resume: the model and every sampling option."""
    resolved = pipeline.plan(dataclasses.replace(request, seed=0)).request
    return {
        "model": pipeline.model_id, "model_sha256": pipeline.weights_sha256, "steps": resolved.steps,
        "sampler": resolved.sampler, "guidance": resolved.guidance, "shift": resolved.shift,
        "slices": request.slices, "format": suffix,
    }


def run_batch(
    pipeline: CTFlowPipeline, items: list[Item], out: BatchFolder, options: GenerationRequest,
    rank: int = 0, world: int = 1, cancel: CancelFlag | None = None,
    on_item: Callable[[Item, str, BatchResult], None] | None = None,
) -> BatchResult:
    """Make this rank's share of `items` into `out`; `options` carries the sampling options (its report is unused).

    A failing item is reported and skipped, the others go on. The merged manifest is written when every item
    of the whole batch is finished (by whichever rank gets there), or always for a single process.
    """
    out.create()
    out.claim_settings(batch_settings(pipeline, dataclasses.replace(options, report=items[0].report.text), out.suffix))
    result = BatchResult()
    for item in shard(items, rank, world):
        if out.finished(item):
            result.skipped.append(item.name)
            status = "skipped"
        else:
            status = _make_item(pipeline, item, out, options, rank, cancel, result)
        if on_item is not None:
            on_item(item, status, result)
        if cancel is not None and cancel.is_set():
            return result
    if world == 1 or all(out.finished(item) for item in items):
        merge_manifest(out.folder, items)
        result.merged = True
    return result


def _make_item(pipeline, item: Item, out: BatchFolder, options: GenerationRequest, rank: int, cancel, result) -> str:
    request = dataclasses.replace(options, report=item.report.text, seed=item.seed,
                                  slices=item.report.slices or options.slices)
    started = time.perf_counter()
    try:
        volume = pipeline.generate(request, cancel=cancel)
        if volume.provenance.partial:
            return "cancelled"
        path = out.write(item, volume)
    except CTFlowError as exc:
        result.failed[item.name] = str(exc)
        return "failed"
    row = manifest_row(item, volume.provenance, path, volume.shape[0], time.perf_counter() - started, rank)
    atomic_write(out.row(item), lambda tmp: tmp.write_text(json.dumps(row) + "\n"), overwrite=True)
    result.made.append(item.name)
    return "made"


def manifest_row(item: Item, provenance, path: Path, slices: int, seconds: float, rank: int) -> dict:
    return {
        "file": path.name, "report_id": item.report.id, "report": item.report.text, "seed": item.seed,
        "slices": slices, "slices_requested": provenance.slices_requested, "block_slices": provenance.block_slices,
        "model": provenance.model, "model_sha256": provenance.model_sha256, "sha256": sha256_of(path),
        "time_s": round(seconds, 3), "steps": provenance.steps, "sampler": provenance.sampler,
        "guidance": provenance.guidance, "shift": provenance.shift, "device": provenance.device, "rank": rank,
        "order": item.report.order,
    }


def sha256_of(path: Path) -> str:
    """A file's SHA-256; for a DICOM series folder, the SHA-256 of its files' SHA-256s in name order."""
    if path.is_file():
        return sha256_file(path)
    return hashlib.sha256("".join(sha256_file(p) for p in sorted(path.iterdir())).encode()).hexdigest()


def merge_manifest(folder: str | os.PathLike, items: list[Item] | None = None) -> list[dict]:
    """Write manifest.csv and manifest.json from the rows present, in table order (rows of a folder whose
    volume is gone are left out). Safe to run at any time and from any rank."""
    out = BatchFolder(folder)
    if not out.items.is_dir():
        raise CTFlowError(f"{folder} holds no batch (no {MANIFEST_DIR}/{ITEMS_DIR} folder)")
    rows = [row for row in out.rows() if (out.folder / row["file"]).exists()]
    rows.sort(key=lambda row: (row["order"], row["seed"]))
    settings_path = out.folder / MANIFEST_DIR / SETTINGS
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    document = {"settings": settings, "items": len(items) if items is not None else None,
                "finished": len(rows), "rows": [{key: row.get(key) for key in COLUMNS} for row in rows]}
    atomic_write(out.folder / MANIFEST_JSON, lambda tmp: tmp.write_text(json.dumps(document, indent=1) + "\n"),
                 overwrite=True)
    atomic_write(out.folder / MANIFEST_CSV, lambda tmp: _write_csv(tmp, document["rows"]), overwrite=True)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def read_manifest(folder: str | os.PathLike) -> list[dict]:
    """The merged manifest's rows (what QA and the metrics read to know each volume's report and seed)."""
    path = Path(folder) / MANIFEST_JSON
    if not path.is_file():
        raise CTFlowError(f"{folder} has no {MANIFEST_JSON}; run `ctflow batch ... --merge-only` to write it")
    return json.loads(path.read_text())["rows"]
