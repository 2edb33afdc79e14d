"""Where prepared training data lands, for CT-RATE and the synthetic cohort alike.

Layout of an output folder:
  volumes/<name>.nii.gz  int16 HU in the model space, white end slices included
  reports/<name>.txt     "Findings: ...\\nImpressions: ..."
  labels/<name>.json     findings with their parameters and the 18 CT-RATE labels (cohort only)
  masks/<name>.nii.gz    the voxels each finding drew, as findings.CODES, end slices excluded (cohort only)
  index.jsonl            one line per written case: paths, report sections, slice counts, spacing
  skipped.json           cases left out, each with its source and the reason
The index is written as cases finish, so an interrupted run still leaves a usable index.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ctflow.conventions import real_slices
from ctflow.errors import CTFlowError
from ctflow.io import write_volume
from ctflow.report import Report
from ctflow.volume import Volume

INDEX, SKIPPED = "index.jsonl", "skipped.json"
TWIN_SUFFIX = re.compile(r"_with(out)?_[a-z_]+$")  # cohort twins: <patient>_with_X, _without_X, _with_right_X
CTRATE_VOLUME = re.compile(r"^((?:train|valid)_\d+)_[a-z]+_\d+$")  # CT-RATE: <split>_<patient>_<scan>_<reconstruction>


def patient_of(name: str) -> str:
    """The patient a volume shows: a cohort twin's name without its suffix, a CT-RATE volume's patient
    (train_12_a_2, its scan a in reconstruction 2, -> train_12), any other name as it is."""
    name = TWIN_SUFFIX.sub("", name)
    scan = CTRATE_VOLUME.match(name)
    return scan.group(1) if scan else name


def read_index(folder: str | Path) -> list[dict]:
    """The cases of a prepared folder, in the order they were written."""
    path = Path(folder) / INDEX
    if not Path(folder).is_dir():
        raise CTFlowError(f"data folder {folder} does not exist")
    if not path.is_file():
        raise CTFlowError(f"{folder} is not a prepared data folder: it has no {INDEX} "
                          "(make one with ctflow-train cohort or prepare-ctrate)")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as exc:
            raise CTFlowError(f"{path} line {number} is not JSON: {exc.msg}") from exc
        if entry is not None and not isinstance(entry, dict):
            raise CTFlowError(f"{path} line {number} is not a JSON object")
        entries += [entry] if entry is not None else []
    return entries


def check_free(folder: Path, overwrite: bool) -> None:
    """A prepared folder is never replaced unasked: refuse one whose index lists a case unless overwriting (an empty
    index, left by a run that failed before its first case, holds nothing to lose)."""
    index = folder / INDEX
    if index.exists() and index.read_text(encoding="utf-8", errors="replace").strip() and not overwrite:
        raise CTFlowError(f"{folder} already holds prepared data ({INDEX}); pass --overwrite to replace it, "
                          "or choose another --out")


def remove_cases(folder: Path) -> None:
    """Remove the cases an earlier index lists (only files inside the folder), then the index: no orphans."""
    if not (folder / INDEX).exists():
        return
    root = folder.resolve()
    for entry in read_index(folder):
        for key in ("volume", "report", "labels", "mask"):
            path = folder / str(entry.get(key) or "")
            if entry.get(key) and path.resolve().is_relative_to(root) and path.is_file():
                path.unlink()
    (folder / INDEX).unlink()
    (folder / SKIPPED).unlink(missing_ok=True)


class DatasetWriter:
    """Writes cases and the index/skip report of one output folder; use as a context manager."""

    def __init__(self, folder: str | Path, overwrite: bool = False):
        self.folder = Path(folder)
        check_free(self.folder, overwrite)
        remove_cases(self.folder)
        for sub in ("volumes", "reports"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self._index = open(self.folder / INDEX, "w", encoding="utf-8")
        self.written = 0
        self.skipped: list[dict] = []

    def add(self, name: str, volume: Volume, report: Report, labels: dict | None = None,
            finding_mask: np.ndarray | None = None) -> dict:
        """Write one case and its index line; returns the line. `finding_mask` [content slices, H, W] shares the
        volume's grid."""
        entry = {
            "name": name,
            "volume": f"volumes/{name}.nii.gz",
            "report": f"reports/{name}.txt",
            "labels": None,
            "mask": None,
            "findings": report.findings,
            "impressions": report.impressions,
            "slices": real_slices(volume.hu),
            "total_slices": int(volume.hu.shape[0]),
            "spacing": [round(s, 4) for s in volume.geometry.spacing],
        }
        write_volume(volume, self.folder / entry["volume"], overwrite=True)
        (self.folder / entry["report"]).write_text(report.text + "\n", encoding="utf-8")
        if labels is not None:
            entry["labels"] = f"labels/{name}.json"
            (self.folder / "labels").mkdir(exist_ok=True)
            (self.folder / entry["labels"]).write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")
        if finding_mask is not None:
            entry["mask"] = f"masks/{name}.nii.gz"
            (self.folder / "masks").mkdir(exist_ok=True)
            write_volume(Volume(finding_mask.astype(np.int16), volume.geometry, None), self.folder / entry["mask"],
                         overwrite=True)
        self._index.write(json.dumps(entry) + "\n")
        self._index.flush()
        self.written += 1
        return entry

    def skip(self, name: str, source: str | Path, reason: str) -> None:
        self.skipped.append({"name": name, "source": str(source), "reason": reason})

    def close(self) -> None:
        """Finish the index and write the skip report (also when the run stops on an error)."""
        self._index.close()
        (self.folder / SKIPPED).write_text(json.dumps(self.skipped, indent=1) + "\n", encoding="utf-8")

    def summary(self) -> dict:
        return {"folder": str(self.folder), "written": self.written, "skipped": len(self.skipped)}

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
