"""Many volumes from a table of reports: one per (report, seed), resumable, and shared out over torchrun ranks.

Layout of an output folder:
  <id>_s<seed>.nii.gz            the volumes (or .nrrd, or <id>_s<seed>.dcm/ DICOM series folders)
  .manifest/batch.json           the settings the batch was started with; a resume must use the same
  .manifest/items/<id>_s<seed>.json  one manifest row per finished item, written atomically after its volume
  .manifest/locks/<id>_s<seed>.lock  locked while a process makes the item: two batches on one folder share it
  manifest.csv, manifest.json    all rows merged, in table order

An item is finished when its volume and its row both exist. A resume skips finished items and never
rewrites their files; a volume without a row (the run stopped between the two writes) is made again.
Ranks share nothing but this folder, so no process group is needed: each rank takes every
world-th item, and whichever rank finds every row present writes the merged manifest (the content is
the same whoever writes it). `merge_manifest` writes it from whatever rows exist, at any time. Two batches
started on the same folder by mistake never make an item twice: each locks an item before making it and
leaves locked ones to their owner (the OS drops the lock of a killed process).

As DICOM, each item is one series, and the series of one report form one study of one fictitious patient (a
teaching set shows a finding's variations side by side); the study UID is derived from the report id and a
random batch UUID in .manifest/dicom.json, so every rank derives the same one.

The VLM3D text-to-CT challenge's input, a .json array of {"input_image_name", "report"}, is a reports table
too: each volume is then named <input_image_name>.nii.gz (without a volume suffix the name may carry), one seed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import CTFlowError, ReportError
from .io import (
    DICOM, DICOM_SUFFIX, TEMP_PREFIX, StagedWrites, atomic_write, check_writable_folder, read_json_object,
    volume_stem, write_volume,
)
from .checksums import TOOL_FILES, sha256_file
from .config import MAX_SEED, MAX_SLICES
from .pipeline import CancelFlag, CTFlowPipeline, GenerationRequest, check_options, with_defaults
from .report import Report, parse_report, reading_of
from .tables import read_table_rows, row_id, safe_id

MANIFEST_DIR, ITEMS_DIR, LOCKS_DIR, SETTINGS = ".manifest", "items", "locks", "batch.json"
DICOM_STUDIES = "dicom.json"
MANIFEST_CSV, MANIFEST_JSON = "manifest.csv", "manifest.json"
COLUMNS = ("file", "report_id", "report", "reading", "seed", "slices", "slices_requested", "block_slices", "model",
           "model_sha256", "sha256", "time_s", "steps", "sampler", "guidance", "side_guidance", "finding_guidance",
           "shift", "device", "dtype", "rank")
LATER_SETTINGS = ("dtype",)  # settings a batch.json of an older ctflow lacks: such a batch resumes as it was
MAX_ITEMS = 1_000_000  # volumes in one batch: more is a typo (or a batch to split), not a week of GPU time
CHALLENGE_NAME = "input_image_name"  # VLM3D text-to-CT challenge: the output file's name
SECTION_KEYS = (("findings", "impressions"), ("Findings_EN", "Impressions_EN"))


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
    busy: list[str] = field(default_factory=list)  # being made by another process on the same folder
    merged: bool = False


def read_reports(path: str | os.PathLike) -> list[ReportRow]:
    """The reports of a table. Text comes from a `report` column, or from Findings/Impressions columns (as in
    CT-RATE's reports CSV and the training cohort's index.jsonl); the id from id/name/VolumeName (else the row
    number); an optional `slices` column asks for an exact length. Every row is checked here, before any work."""
    rows = read_table_rows(path)
    if not rows:
        raise CTFlowError(f"{path} holds no reports")
    reports = [_report_row(row, order, f"{path} {where}") for order, (where, row) in enumerate(rows)]
    seen: dict[str, ReportRow] = {}
    for report in reports:
        key = report.id.casefold()  # Windows and macOS file names ignore case: Case1 and case1 are one file there
        if key in seen:
            first = seen[key]
            same = "the same id" if first.id == report.id else "ids that differ only in case"
            raise CTFlowError(f"{path}: rows {first.order + 1} and {report.order + 1} have {same} ({first.id!r}, "
                              f"{report.id!r}); their files would be one")
        seen[key] = report
    return reports


def _report_row(row: dict, order: int, where: str) -> ReportRow:
    text = row.get("report")
    if not text:
        for findings, impressions in SECTION_KEYS:
            if row.get(findings) or row.get(impressions):
                text = Report(str(row.get(findings) or ""), str(row.get(impressions) or "")).text
                break
    if not text or not str(text).strip():
        raise CTFlowError(f"{where} has no report text (columns report, or findings/impressions)")
    try:
        parse_report(str(text))
    except ReportError as exc:
        raise CTFlowError(f"{where}: {exc}") from exc
    slices = _slices_cell(row.get("slices"), where)
    if row.get(CHALLENGE_NAME):
        return ReportRow(safe_id(volume_stem(str(row[CHALLENGE_NAME]))), str(text), slices, order, named=True)
    return ReportRow(row_id(row, order), str(text), slices, order)


def _slices_cell(value: object, where: str) -> int | None:
    """An optional exact length: empty, or a whole number from 1 to MAX_SLICES (as a JSON number or CSV text), checked
    with the table, before any model loads."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SLICES:
        raise CTFlowError(f"{where}: slices must be a whole number from 1 to {MAX_SLICES} (or empty), not {value!r}")
    return value


def plan_items(reports: Iterable[ReportRow], seeds: int, first_seed: int = 0) -> list[Item]:
    """Every (report, seed) pair in table order; the seeds are first_seed ... first_seed + seeds - 1."""
    if seeds < 1:
        raise CTFlowError(f"--seeds must be at least 1, not {seeds}")
    reports = list(reports)
    if len(reports) * seeds > MAX_ITEMS:
        raise CTFlowError(f"{len(reports)} reports x {seeds} seeds is more than the {MAX_ITEMS:,} volumes one batch "
                          "holds: split the table or use fewer seeds")
    if not 0 <= first_seed <= MAX_SEED - seeds + 1:
        raise CTFlowError(f"--seed must be a whole number from 0 to {MAX_SEED - seeds + 1} with --seeds {seeds}, "
                          f"not {first_seed}")
    if seeds > 1 and any(report.named for report in reports):
        raise CTFlowError(f"{CHALLENGE_NAME} names one volume per report: use --seeds 1")
    return [Item(report, first_seed + k) for report in reports for k in range(seeds)]


def check_out_folder(folder: Path, started: bool = False) -> None:
    """Fail before the model loads if `folder` cannot be a batch folder: a batch writes into a new or empty folder,
    or into one it made earlier (to resume), never among a user's own files. `started`: it must be one it made."""
    if folder.exists() and not folder.is_dir():
        raise CTFlowError(f"--out {folder} is not a folder; give a folder for the volumes")
    ours = (folder / MANIFEST_DIR).is_dir()
    # another rank's write probe (a temp file) is no user's file: ranks check a folder made beforehand at once
    holds = folder.is_dir() and any(not path.name.startswith(TEMP_PREFIX) and path.name not in TOOL_FILES
                                    for path in folder.iterdir())  # nor Finder's .DS_Store a user's file
    if not ours and (started or holds):
        what = ("does not exist" if not folder.exists() else "holds files but no batch (no .manifest folder)" if holds
                else "holds no batch")
        raise CTFlowError(f"--out {folder} {what}: " + ("give the folder of a batch" if started else
                          "give a new or empty folder, or the folder of a batch to resume"))
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise CTFlowError(f"--out {folder}: {existing} is a file, not a folder")
    check_writable_folder(existing)


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
        self.locks.mkdir(exist_ok=True)

    @property
    def locks(self) -> Path:
        return self.folder / MANIFEST_DIR / LOCKS_DIR

    @contextlib.contextmanager
    def claim(self, item: Item) -> Iterator[bool]:
        """Hold `item`'s lock while making it: yields True if this process has it, False if another one is making
        the item. The OS drops a lock when its process ends, so a killed run's items are free again."""
        with open(self.locks / f"{item.name}.lock", "a+b") as handle:
            yield _try_lock(handle)  # closing the file releases the lock

    def remove_if_unused(self) -> None:
        """Remove a folder this run created and made nothing in: only the bookkeeping is there."""
        ours = {self.folder / MANIFEST_DIR}
        if set(self.folder.iterdir()) == ours and not any(self.items.iterdir()):
            shutil.rmtree(self.folder, ignore_errors=True)

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

        return write_dicom(volume, self.volume(item), overwrite=True, study=self.study(item.report.id),
                           series_number=item.seed + 1 if 0 <= item.seed < 2**31 - 1 else 1)

    def claim_studies(self) -> dict:
        """The batch's DICOM studies (a namespace for their UIDs, and their date): claimed once, as the batch
        starts, so no study is dated after a series in it; every rank and a resumed batch read the same."""
        path = self.folder / MANIFEST_DIR / DICOM_STUDIES
        claim = {"namespace": str(uuid.uuid4()), "created": dt.datetime.now(dt.timezone.utc).isoformat()}
        try:
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(claim) + "\n", encoding="utf-8"))
        except FileExistsError:
            claim = json.loads(path.read_text(encoding="utf-8"))
        return claim

    def study(self, report_id: str):
        """The DICOM study of a report: the same for all its seeds, on every rank, and unique to this batch."""
        from .dicom import NOT_FOR_DIAGNOSIS, Study, derived_uid

        claim = self.claim_studies()
        return Study(derived_uid(claim["namespace"], report_id), f"report {report_id} - {NOT_FOR_DIAGNOSIS}",
                     dt.datetime.fromisoformat(claim["created"]))

    def claim_settings(self, settings: dict) -> None:
        """Record the batch settings, or check that a resumed batch uses the ones it was started with."""
        try:
            atomic_write(self.settings_file,
                         lambda tmp: tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8"))
        except FileExistsError:
            self.check_settings(settings)

    @property
    def settings_file(self) -> Path:
        return self.folder / MANIFEST_DIR / SETTINGS

    def check_settings(self, settings: dict, keys: Iterable[str] | None = None) -> None:
        """Refuse a resume with other settings than the batch was started with: all of them, or `keys` (before the
        model loads, the sampling settings its config gives)."""
        if not self.settings_file.is_file():
            return
        started = json.loads(self.settings_file.read_text(encoding="utf-8"))
        started = {**{key: settings[key] for key in LATER_SETTINGS if key not in started and key in settings},
                   **started}
        keys = settings.keys() | started.keys() if keys is None else keys
        changed = sorted(key for key in keys if settings.get(key) != started.get(key))
        if changed:
            raise CTFlowError(f"{self.folder} holds a batch made with other settings ({', '.join(changed)}); "
                              "resume it with the same options or choose a new --out folder")

    def rows(self, items: list[Item] | None = None) -> list[dict]:
        """The rows of the finished items (of `items` only, when given)."""
        names = None if items is None else {item.name for item in items}
        return [json.loads(path.read_text(encoding="utf-8")) for path in sorted(self.items.glob("*.json"))
                if names is None or path.stem in names]

    def check_resume(self, items: list[Item], slices: int | None) -> None:
        """Refuse to resume from a table that gives an item made before another report or length (`slices`: the
        batch's --slices): its volume would stay, and the manifest would pair it with the new report."""
        changed = []
        for item in items:
            if self.row(item).is_file():
                row = json.loads(self.row(item).read_text(encoding="utf-8"))
                if row.get("report") != item.report.text or row.get("slices_requested") != (item.report.slices or slices):
                    changed.append(item.name)
        if changed:
            listed = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
            raise CTFlowError(f"{self.folder}: {listed} were made from another report or length than the table gives "
                              "them now; resume with the table the batch was made from, or choose a new --out folder")


def _try_lock(handle) -> bool:
    """Lock an open file without waiting; False if another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


# "side_guidance": the former kind's, which no batch writes now; a batch that has it is refused before the load.
SAMPLING_SETTINGS = ("steps", "sampler", "guidance", "shift", "slices", "format", "side_guidance_by_halves",
                     "side_guidance", "finding_guidance")


def batch_settings(pipeline: CTFlowPipeline, request: GenerationRequest, suffix: str) -> dict:
    """What must not change between a batch and its resume: the model and every sampling option."""
    return {"model": pipeline.model_id, "model_sha256": pipeline.model_sha256,
            **sampling_settings(request, pipeline.config, suffix), "dtype": pipeline.precision}


def sampling_settings(request: GenerationRequest, config, suffix: str) -> dict:
    """The SAMPLING_SETTINGS of a batch: the request's options with the model config's defaults (known before the
    model loads)."""
    check_options(request, config)
    resolved = with_defaults(request, config.sampling)
    settings = {"steps": resolved.steps, "sampler": resolved.sampler, "guidance": resolved.guidance,
                "shift": resolved.shift, "slices": request.slices, "format": suffix}
    # Only when set: a batch started without side guidance resumes as it was. Named by its kind: a batch started
    # with the former kind ("side_guidance", away from the mirrored report) is refused, not finished by halves.
    if resolved.side_guidance:
        settings["side_guidance_by_halves"] = resolved.side_guidance
    if resolved.finding_guidance:
        settings["finding_guidance"] = resolved.finding_guidance
    return settings


def run_batch(
    pipeline: CTFlowPipeline, items: list[Item], out: BatchFolder, options: GenerationRequest,
    rank: int = 0, world: int = 1, cancel: CancelFlag | None = None,
    on_item: Callable[[Item, str, BatchResult], None] | None = None,
) -> BatchResult:
    """Make this rank's share of `items` into `out`; `options` carries the sampling options (its report is unused).

    A failing item is reported and skipped, the others go on; an item another process is making is left to it.
    The merged manifest is written when every item of the whole batch is finished (by whichever process gets
    there), or by a single process that left nothing to another. A folder this call created and made nothing
    in is removed again.
    """
    settings = batch_settings(pipeline, options, out.suffix)
    check_out_folder(out.folder)
    created = not out.folder.exists()
    out.create()
    result = BatchResult()
    try:
        out.claim_settings(settings)
        out.check_resume(items, options.slices)
        if out.format == DICOM:
            out.claim_studies()
        for item in shard(items, rank, world):
            status = _run_item(pipeline, item, out, options, rank, cancel, result)
            if on_item is not None:
                on_item(item, status, result)
            if cancel is not None and cancel.is_set():
                return result
    finally:
        if created and not result.made:
            out.remove_if_unused()
    if not out.folder.exists():
        return result
    if all(out.finished(item) for item in items) or (world == 1 and not result.busy):
        merge_manifest(out.folder, items)
        result.merged = True
    return result


def _run_item(pipeline, item: Item, out: BatchFolder, options: GenerationRequest, rank: int, cancel, result) -> str:
    if out.finished(item):
        result.skipped.append(item.name)
        return "skipped"
    with out.claim(item) as mine:
        if not mine:
            result.busy.append(item.name)
            return "busy"
        if out.finished(item):  # the other process finished it between the two checks
            result.skipped.append(item.name)
            return "skipped"
        return _make_item(pipeline, item, out, options, rank, cancel, result)


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
    atomic_write(out.row(item), lambda tmp: tmp.write_text(json.dumps(row) + "\n", encoding="utf-8"), overwrite=True)
    result.made.append(item.name)
    return "made"


def manifest_row(item: Item, provenance, path: Path, slices: int, seconds: float, rank: int) -> dict:
    return {
        "file": path.name, "report_id": item.report.id, "report": item.report.text,
        "reading": reading_of(parse_report(item.report.text)), "seed": item.seed,
        "slices": slices, "slices_requested": provenance.slices_requested, "block_slices": provenance.block_slices,
        "model": provenance.model, "model_sha256": provenance.model_sha256, "sha256": sha256_of(path),
        "time_s": round(seconds, 3), "steps": provenance.steps, "sampler": provenance.sampler,
        "guidance": provenance.guidance, "side_guidance": provenance.side_guidance,
        "finding_guidance": provenance.finding_guidance, "shift": provenance.shift,
        "device": provenance.device, "dtype": provenance.dtype, "rank": rank,
        "order": item.report.order,
    }


def sha256_of(path: Path) -> str:
    """A file's SHA-256; for a DICOM series folder, the SHA-256 of its files' SHA-256s in name order."""
    if path.is_file():
        return sha256_file(path)
    return hashlib.sha256("".join(sha256_file(p) for p in sorted(path.iterdir())).encode()).hexdigest()


def merge_manifest(folder: str | os.PathLike, items: list[Item] | None = None) -> list[dict]:
    """Write manifest.csv and manifest.json from the rows present, in table order (rows of a folder whose
    volume is gone are left out, and with `items`, those of no item of the table). Safe to run at any time and
    from any rank."""
    out = BatchFolder(folder)
    if not out.items.is_dir():
        raise CTFlowError(f"{folder} holds no batch (no {MANIFEST_DIR}/{ITEMS_DIR} folder)")
    rows = [row for row in out.rows(items) if (out.folder / row["file"]).exists()]
    rows.sort(key=lambda row: (row["order"], row["seed"]))
    settings_path = out.folder / MANIFEST_DIR / SETTINGS
    settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
    document = {"settings": settings, "items": len(items) if items is not None else None,
                "finished": len(rows), "rows": [{key: row.get(key) for key in COLUMNS} for row in rows]}
    with StagedWrites(overwrite=True) as staged:  # both or neither: a kill between them leaves them agreeing
        staged.add(out.folder / MANIFEST_JSON,
                   lambda tmp: tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8"))
        staged.add(out.folder / MANIFEST_CSV, lambda tmp: _write_csv(tmp, document["rows"]))
        staged.commit()
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
    rows = read_json_object(path).get("rows")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise CTFlowError(f"{path} has no list of rows; run `ctflow batch ... --merge-only` to write it again")
    return rows
