"""Reading and writing volumes as .nii.gz / .nrrd / .mha with provenance in the header, or as a DICOM series folder.

Writes are atomic (a temporary file or folder beside the target, then a rename), and an existing file is
never replaced unless the caller passes overwrite=True. A path ending in .dcm or a path separator, or an
existing folder, means a DICOM series folder (see dicom.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import CTFlowError, OutputExistsError
from .volume import Geometry, Provenance, Volume

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DICOM, DICOM_SUFFIX = "dicom", ".dcm"
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS flips the first two axes
_SYNTHETIC_HEADER = "SYNTHETIC CT (CTFlow) - not for diagnosis"
_FIELD_PREFIX = "CTFlow_"  # provenance keys in NRRD and MetaImage headers


def volume_format(path: str | os.PathLike) -> str:
    """The writer's suffix for `path`, or a clear error naming the supported ones."""
    name = str(path).lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise CTFlowError(f"unsupported output file type {Path(path).name!r}: use one of {', '.join(SUFFIXES)}")


def check_output_path(path: str | os.PathLike, overwrite: bool, suffixes: tuple[str, ...] = SUFFIXES) -> Path:
    """Fail before any work is done if `path` cannot be written."""
    path = Path(path)
    if not path.name.lower().endswith(suffixes):
        raise CTFlowError(f"unsupported file type {path.name!r}: use one of {', '.join(suffixes)}")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another name or pass --overwrite")
    if not path.parent.is_dir():
        raise CTFlowError(f"output folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise CTFlowError(f"output folder {path.parent} is not writable")
    return path


def is_dicom_path(path: str | os.PathLike) -> bool:
    """A DICOM series folder is meant: a name ending in .dcm or a separator ("out/ct/"), or an existing folder."""
    text = os.fspath(path)
    return text.lower().endswith(DICOM_SUFFIX) or text.endswith(("/", os.sep)) or Path(path).is_dir()


def check_volume_output(path: str | os.PathLike, overwrite: bool, format: str | None = None) -> Path:
    """check_output_path for a volume file, or the same checks for a DICOM series folder."""
    if format == DICOM or is_dicom_path(path):
        from .dicom import check_dicom_folder

        return check_dicom_folder(path, overwrite)
    return check_output_path(path, overwrite)


def write_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False, format: str | None = None) -> Path:
    """Write `volume` to .nii.gz/.nii/.nrrd/.mha, or as a DICOM series folder (format="dicom" or a folder path),
    atomically; returns the path written."""
    if format == DICOM or is_dicom_path(path):
        from .dicom import write_dicom

        return write_dicom(volume, path, overwrite=overwrite)
    path = check_output_path(path, overwrite)
    writer = {".nrrd": _write_nrrd, ".mha": _write_mha}.get(volume_format(path), _write_nifti)
    return atomic_write(path, lambda tmp: writer(volume, tmp), overwrite=overwrite)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it


def plain_mode(directory: bool = False) -> int:
    """The permissions open() or mkdir() would give: temporary files are private, what they become is not."""
    return (0o777 if directory else 0o666) & ~_UMASK


def atomic_write(path: Path, write, overwrite: bool = False) -> Path:
    """Call write(tmp_path) on a sibling temporary file, then move it onto `path` in one step."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(plain_mode())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if path appeared meanwhile: never clobbers
            except FileExistsError as exc:
                raise OutputExistsError(f"{path} already exists; choose another name or pass --overwrite") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_folder(folder: Path, fill) -> Path:
    """Call fill(staging) on a sibling temporary folder, make its contents shareable, then move it onto `folder` in
    one step (replacing a folder there: the caller has checked that it may)."""
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fill(staging)
        for path in [staging, *staging.rglob("*")]:  # mkdtemp and safetensors make them private; a model is shared
            path.chmod(plain_mode(path.is_dir()))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a volume written by write_volume (or any CT in these formats, or a CT series folder, or one of its
    DICOM files; provenance is then None)."""
    path = Path(path)
    if path.is_dir() or path.name.lower().endswith(DICOM_SUFFIX):
        from .dicom import read_dicom

        return read_dicom(path)
    if not path.is_file():
        raise CTFlowError(f"{path} does not exist")
    reader = {".nrrd": _read_nrrd, ".mha": _read_mha}.get(volume_format(path), _read_nifti)
    return reader(path)


def _write_nifti(volume: Volume, path: Path) -> None:
    import nibabel as nib

    affine = volume.geometry.ijk_to_ras()
    image = nib.Nifti1Image(np.ascontiguousarray(volume.hu.transpose(2, 1, 0)).astype(np.int16), affine)
    header = image.header
    header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if volume.provenance is not None:  # only what ctflow made is marked synthetic (training data may be real CT)
        header["descrip"] = _SYNTHETIC_HEADER.encode()
        header["intent_name"] = b"SYNTHETIC"
        payload = json.dumps({"ctflow_provenance": volume.provenance.as_dict()}).encode()
        header.extensions.append(nib.nifti1.Nifti1Extension("comment", payload))
    nib.save(image, str(path))


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        hu = np.asarray(image.dataobj).transpose(2, 1, 0)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CTFlowError(f"cannot read {path}: {exc}") from exc
    provenance = None
    for extension in image.header.extensions:
        try:
            provenance = Provenance.from_dict(json.loads(extension.get_content())["ctflow_provenance"])
        except (ValueError, KeyError, TypeError):
            continue
    geometry = Geometry.from_ijk_to_ras(image.affine)
    return Volume(np.rint(hu).astype(np.int16), geometry, provenance)


def _write_nrrd(volume: Volume, path: Path) -> None:
    import nrrd

    lps = _LPS @ volume.geometry.ijk_to_ras()
    header = {
        "type": "int16",
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,  # one row per axis
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
    }
    if volume.provenance is not None:
        header["content"] = _SYNTHETIC_HEADER
    header.update(_provenance_fields(volume.provenance))
    nrrd.write(str(path), np.ascontiguousarray(volume.hu.transpose(2, 1, 0)).astype(np.int16), header, index_order="F")


def _read_nrrd(path: Path) -> Volume:
    import nrrd

    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as exc:  # pynrrd raises several types for damaged files
        raise CTFlowError(f"cannot read {path}: {exc}") from exc
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    matrix[:3, 3] = np.asarray(header.get("space origin", [0.0, 0.0, 0.0]), dtype=float)
    if header.get("space", "left-posterior-superior") in ("left-posterior-superior", "LPS"):
        matrix = _LPS @ matrix
    provenance = _provenance_from_fields(header)
    return Volume(np.asarray(data).transpose(2, 1, 0).astype(np.int16), Geometry.from_ijk_to_ras(matrix), provenance)


def _write_mha(volume: Volume, path: Path) -> None:
    from .metaimage import write_mha

    write_mha(volume, path, _provenance_fields(volume.provenance))


def _read_mha(path: Path) -> Volume:
    from .metaimage import read_mha

    volume, header = read_mha(path)
    volume.provenance = _provenance_from_fields(header)
    return volume


def _provenance_fields(provenance: Provenance | None) -> dict[str, str]:
    """Provenance as header entries of one ASCII line each (NRRD, MetaImage)."""
    if provenance is None:
        return {}
    return {_FIELD_PREFIX + key: value.encode("unicode_escape").decode("ascii")
            for key, value in provenance.as_dict().items()}


def _provenance_from_fields(header: dict) -> Provenance | None:
    fields = {
        key[len(_FIELD_PREFIX) :]: value.encode("ascii").decode("unicode_escape")
        for key, value in header.items()
        if key.startswith(_FIELD_PREFIX)
    }
    return Provenance.from_dict(fields) if fields else None

