"""Reading and writing volumes as .nii.gz / .nrrd / .mha with provenance in the header, or as a DICOM series folder.

Writes are atomic (a temporary file or folder beside the target, then a rename; several commit together, all or none),
and an existing file is never replaced unless the caller passes overwrite=True. Temporary files are named
.ctflow-tmp.<host>-<pid>.<random>, with no volume suffix, so no reader takes one a killed run left for a volume; the
next write in that folder removes such leftovers. A path ending in .dcm or a path separator, or an existing
folder without a volume file's suffix, means a DICOM series folder (see dicom.py).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .conventions import SYNTHETIC_LABEL
from .errors import CTFlowError, OutputExistsError
from .volume import RAS_TO_LPS, Geometry, Provenance, Volume, hu_voxels

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
DICOM, DICOM_SUFFIX = "dicom", ".dcm"
_LPS = np.diag([*RAS_TO_LPS, 1.0])  # as a 4 x 4 matrix
_NRRD_TO_RAS = {  # NRRD's patient frames (long and short names) -> RAS
    **dict.fromkeys(("right-anterior-superior", "RAS"), np.eye(4)),
    **dict.fromkeys(("left-posterior-superior", "LPS"), _LPS),
    **dict.fromkeys(("left-anterior-superior", "LAS"), np.diag([-1.0, 1.0, 1.0, 1.0])),
}
_FIELD_PREFIX = "CTFlow_"  # provenance keys in NRRD and MetaImage headers
TEMP_PREFIX = ".ctflow-tmp."  # + "<pid>.<random>": whose it is, and no suffix a volume reader would accept
_RUN_STARTED = time.time()  # a temporary file older than this run, whose writer is gone, is a leftover
_SWEPT: set[Path] = set()  # folders already cleared of leftovers by this process
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())  # no "-": the pid follows the last one


MAX_TEXT_FILE = 16 << 20  # configs, manifests, reports and tables are kilobytes: far more is not one of them


def read_text_file(path: Path, error: type[CTFlowError] = CTFlowError, advice: str = "") -> str:
    """A UTF-8 text file's content (without the byte-order mark Notepad and Excel write), or one `error` that names
    the file and says what is wrong (`advice` appended to the encoding case, where the fix is to get the file
    again). Only a regular file of at most MAX_TEXT_FILE bytes is read: a link to /dev/zero or a FIFO is refused
    before it can fill the memory or block."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path} is not a regular file")
        data = b"" if info.st_size > MAX_TEXT_FILE else path.read_bytes()  # read(limit) would allocate the limit
        if info.st_size > MAX_TEXT_FILE or len(data) > MAX_TEXT_FILE:
            raise error(f"{path} is larger than {MAX_TEXT_FILE >> 20} MiB: not a text file ctflow reads{advice}")
        return data.decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise error(f"{path} does not exist") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}){advice}") from exc
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from exc


def volume_suffix(name: str | os.PathLike) -> str:
    """The supported volume suffix `name` ends with, in any case ("ct.NII.GZ" -> ".nii.gz"), or ""."""
    lowered = str(name).lower()
    return next((suffix for suffix in SUFFIXES if lowered.endswith(suffix)), "")


def volume_stem(name: str | os.PathLike) -> str:
    """The name without its volume suffix or a DICOM series' .dcm ("65f4...ed.mha" -> "65f4...ed", "ct.dcm" ->
    "ct"); a name without one as it is."""
    base = Path(name).name
    suffix = volume_suffix(base) or (DICOM_SUFFIX if base.lower().endswith(DICOM_SUFFIX) else "")
    return base[: len(base) - len(suffix)]


def volume_format(path: str | os.PathLike, role: str = "output") -> str:
    """The writer's suffix for `path`, or a clear error naming the supported ones (`role`: the file's, in it)."""
    suffix = volume_suffix(path)
    if not suffix:
        raise CTFlowError(f"unsupported {role} file type {Path(path).name!r}: use one of {', '.join(SUFFIXES)}")
    return suffix


def check_output_path(path: str | os.PathLike, overwrite: bool, suffixes: tuple[str, ...] = SUFFIXES) -> Path:
    """Fail before any work is done if `path` cannot be written."""
    path = Path(path)
    if not path.name.lower().endswith(suffixes):
        raise CTFlowError(f"unsupported file type {path.name!r}: use one of {', '.join(suffixes)}")
    if path.is_dir():
        raise CTFlowError(f"{path} is a folder; give the name of a file to write")
    if path.exists() and not overwrite:
        raise exists_error(path)
    if not path.parent.is_dir():
        what = "is a file, not a folder" if path.parent.exists() else "does not exist"
        raise CTFlowError(f"output folder {path.parent} {what}")
    limit = _name_max(path.parent)
    if len(os.fsencode(path.name)) > limit:
        raise CTFlowError(f"the file name {path.name[:24]}... is too long: {len(os.fsencode(path.name))} bytes, "
                          f"and this file system allows {limit}")
    check_writable_folder(path.parent)
    return path


def exists_error(path: Path) -> OutputExistsError:
    return OutputExistsError(f"{path} already exists; choose another name or pass --overwrite")


def check_writable_folder(folder: Path) -> None:
    """The one sure test: /proc, /sys, read-only mounts and ACLs all say no here, not after the work."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temp_prefix())
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CTFlowError(f"cannot write in {folder}: {exc.strerror or exc}") from exc


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows) or no answer
        return 255


def is_dicom_path(path: str | os.PathLike) -> bool:
    """A DICOM series folder is meant: a name ending in .dcm or a separator ("out/ct/"), or an existing folder
    whose name is not that of a volume file (an existing "ct.nii.gz/" folder is an error, not a series)."""
    text = os.fspath(path)
    existing_folder = Path(path).is_dir() and not volume_suffix(text)
    return text.lower().endswith(DICOM_SUFFIX) or text.endswith(("/", os.sep)) or existing_folder


def check_volume_output(path: str | os.PathLike, overwrite: bool, format: str | None = None) -> Path:
    """check_output_path for a volume file, or the same checks for a DICOM series folder."""
    if format == DICOM or is_dicom_path(path):
        from .dicom import check_dicom_folder

        return check_dicom_folder(path, overwrite)
    return check_output_path(path, overwrite)


def write_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False, format: str | None = None) -> Path:
    """Write `volume` to .nii.gz/.nii/.nrrd/.mha, or as a DICOM series folder (format="dicom" or a folder path),
    atomically; returns the path written."""
    with StagedWrites(overwrite) as staged:
        path = stage_volume(staged, volume, path, format)
        staged.commit()
    return path


def stage_volume(staged: "StagedWrites", volume: Volume, path: str | os.PathLike, format: str | None = None) -> Path:
    """Add `volume` to `staged` as a file, or as a DICOM series folder (write_volume's rule), after the checks
    check_volume_output makes; returns the destination."""
    dicom = format == DICOM or is_dicom_path(path)  # before Path() drops a trailing separator
    path = check_volume_output(path, staged.overwrite, format)
    if dicom:
        from .dicom import dicom_writer

        check_hu(volume)
        return staged.add_folder(path, dicom_writer(volume))
    return staged.add(path, volume_writer(volume, path))


def volume_writer(volume: Volume, path: Path) -> Callable[[Path], None]:
    """write(tmp) for `volume` in the file format `path` names (not a DICOM folder)."""
    check_hu(volume)
    kind = volume_format(path)
    if kind == ".nrrd":
        return lambda tmp: _write_nrrd(volume, tmp)
    if kind == ".mha":
        return lambda tmp: _write_mha(volume, tmp)
    return lambda tmp: _write_nifti(volume, tmp, compressed=kind == ".nii.gz")


def check_hu(volume: Volume) -> None:
    """Refuse voxels that are no HU value: NaN or inf would be cast to arbitrary integers, a file that looks valid."""
    hu = volume.hu
    if not np.issubdtype(hu.dtype, np.integer) and not (np.isfinite(hu).all() and np.abs(hu).max() < 32768):
        raise CTFlowError("the volume holds non-finite (NaN or inf) or out-of-range values; refusing to write it")


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it


def plain_mode(directory: bool = False) -> int:
    """The permissions open() or mkdir() would give: temporary files are private, what they become is not."""
    return (0o777 if directory else 0o666) & ~_UMASK


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call write(tmp_path) on a sibling temporary file, then move it onto `path` in one step."""
    with StagedWrites(overwrite) as staged:
        staged.add(path, write)
        staged.commit()
    return path


class StagedWrites:
    """Files and folders written to temporaries beside their destinations, then moved into place together by
    commit(): all of them or none. A run that fails or is cancelled before commit() leaves none of them, and a
    commit that fails half-way puts back what it replaced. The temporaries' names say nothing about their format,
    so each write(tmp) must not infer the format from the name."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self.staged: list[tuple[Path, Path]] = []  # (temporary, destination)

    def __enter__(self) -> "StagedWrites":
        return self

    def __exit__(self, *exc_info) -> None:
        for tmp, _ in self.staged:
            _remove(tmp)

    def add(self, path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
        """Stage a file: write(tmp) fills a temporary file."""
        path = Path(path)
        remove_stale_temps(path.parent)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix())
        os.close(fd)
        tmp = Path(name)
        self.staged.append((tmp, path))
        write(tmp)
        tmp.chmod(plain_mode())
        return path

    def add_folder(self, folder: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
        """Stage a folder: fill(tmp) fills a temporary folder; readers will see all of it or none."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder.parent)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temp_prefix()))
        self.staged.append((tmp, folder))
        fill(tmp)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp and safetensors make them private; the result is not
            path.chmod(plain_mode(path.is_dir()))
        return folder

    def commit(self) -> None:
        """Move every staged file and folder into place. What was there before is replaced only with `overwrite`,
        and kept aside until all are placed: if one cannot be, every destination is as it was."""
        if not self.overwrite:
            for _, path in self.staged:
                if path.exists() or path.is_symlink():
                    raise exists_error(path)
        placed: list[tuple[Path, Path | None]] = []  # (destination, what it held before, set aside)
        try:
            for tmp, path in self.staged:
                placed.append((path, _place(tmp, path, self.overwrite)))
        except BaseException as exc:
            unplaced = []
            for path, old in reversed(placed):  # every one, even when another cannot be put back
                try:
                    _remove(path)
                    if old is not None:
                        _put_back(old, path)
                except (OSError, CTFlowError) as undo:
                    unplaced.append(str(undo))
            if unplaced and isinstance(exc, Exception):
                raise CTFlowError("; ".join(unplaced)) from exc
            raise
        for _, old in placed:
            if old is not None:
                _remove(old)


def _place(tmp: Path, path: Path, overwrite: bool) -> Path | None:
    """Move `tmp` onto `path`; returns what `path` held, now set aside under a temporary name (None: nothing)."""
    folder = tmp.is_dir()
    old = _set_aside(path, folder) if overwrite and (path.exists() or path.is_symlink()) else None
    try:
        if folder:
            os.rename(tmp, path)  # refuses a non-empty folder that appeared meanwhile
        elif overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except OSError as exc:
        if old is not None:
            _put_back(old, path)
        if folder:
            raise OutputExistsError(f"{path} appeared while it was being written; nothing was replaced") from exc
        if isinstance(exc, FileExistsError):
            raise exists_error(path) from exc
        raise
    return old


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path`, which must not exist: a hard link fails if it appeared meanwhile, so it never
    clobbers. A file system without hard links (FAT, some network shares) gets a rename after a last look."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists() or path.is_symlink():
            raise FileExistsError(path) from None
        os.rename(tmp, path)


def _set_aside(path: Path, folder: bool) -> Path | None:
    """Keep what `path` holds under a temporary name until the commit is whole. A plain file stays where it is
    (a second link to it), so readers never miss it; where no link can be made (FAT, another user's file), None:
    that file is replaced without a way back, as by os.replace alone."""
    old = path.with_name(f"{temp_prefix()}old-{os.urandom(4).hex()}")  # swept like the staging names
    if folder or path.is_symlink():
        os.rename(path, old)
        return old
    try:
        os.link(path, old)
    except OSError:
        return None
    return old


def _put_back(old: Path, path: Path) -> None:
    """Undo _set_aside. What cannot go back gets a name no later run sweeps away, and the error says which."""
    try:
        if path.is_file() and not path.is_symlink() and os.path.samefile(old, path):
            old.unlink()  # the file never left
        else:
            os.replace(old, path)
    except OSError as exc:
        kept = path.with_name(f"{path.name}.previous-{os.urandom(4).hex()}")
        try:
            os.rename(old, kept)
        except OSError:
            kept = old
        raise CTFlowError(f"{path} could not be put back ({exc.strerror or exc}); what it held is now {kept}") from exc


def _remove(path: Path) -> None:
    """Delete a file, link or folder, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temp_prefix(pid: int | None = None) -> str:
    """.ctflow-tmp.<host>-<pid>. : whose a temporary file is, even in a folder that several machines share."""
    return f"{TEMP_PREFIX}{_HOST}-{os.getpid() if pid is None else pid}."


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files (and DICOM series folders) a killed run left in `folder`, once per folder and
    process: only names of ours, older than this run, whose writing process on this machine is gone."""
    folder = Path(folder).resolve()
    if folder in _SWEPT:
        return
    _SWEPT.add(folder)
    for path in folder.glob(f"{TEMP_PREFIX}*"):
        host, _, pid = path.name[len(TEMP_PREFIX):].rpartition(".")[0].rpartition("-")
        try:
            if host == _HOST and path.lstat().st_mtime < _RUN_STARTED and not _running(int(pid)):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except (OSError, ValueError):  # not ours after all, or removed meanwhile by another run
            continue


def _running(pid: int) -> bool:
    if os.name == "nt":  # os.kill would end the process; an open file cannot be deleted there anyway
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object (a manifest, a label file), or one CTFlowError that names the file."""
    try:
        data = json.loads(read_text_file(path))
    except json.JSONDecodeError as exc:
        raise CTFlowError(f"{path} line {exc.lineno}: not JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise CTFlowError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def refuse_foreign_folder(folder: Path, marks: tuple[str, ...], what: str,
                          error: type[CTFlowError] = CTFlowError) -> None:
    """Before an overwrite: `folder` is replaced only when it is empty or holds `marks` (it is `what` this writes
    there), never a folder of a user's other files that a slip of --out named."""
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir())
                                                     or all((folder / mark).is_file() for mark in marks))):
        raise error(f"{folder} is not {what} (it lacks {' and '.join(marks)}): it is never replaced, even when "
                    "asked to; choose another folder")


def atomic_folder(folder: Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call fill(staging) on a sibling temporary folder, then rename it onto `folder`: readers see all of it or
    none. A folder already there is replaced only with `overwrite`, and kept if the new one cannot take its place;
    a killed run's staging folder is removed by the next run in that folder."""
    with StagedWrites(overwrite) as staged:
        staged.add_folder(folder, fill)
        staged.commit()
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
    reader = {".nrrd": _read_nrrd, ".mha": _read_mha}.get(volume_format(path, "input"), _read_nifti)
    return reader(path)


def _write_nifti(volume: Volume, path: Path, compressed: bool = True) -> None:
    import nibabel as nib

    affine = volume.geometry.ijk_to_ras()
    image = nib.Nifti1Image(np.ascontiguousarray(volume.hu.transpose(2, 1, 0)).astype(np.int16), affine)
    header = image.header
    header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if volume.provenance is not None:  # only what ctflow made is marked synthetic (training data may be real CT)
        header["descrip"] = SYNTHETIC_LABEL.encode()
        header["intent_name"] = b"SYNTHETIC"
        payload = json.dumps({"ctflow_provenance": volume.provenance.as_dict()}).encode()
        header.extensions.append(nib.nifti1.Nifti1Extension("comment", payload))
    with open(path, "wb") as handle:  # nibabel would pick the format from the (temporary) name
        if compressed:
            with gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=1, mtime=0) as stream:  # nibabel's level
                stream.write(image.to_bytes())
        else:
            handle.write(image.to_bytes())


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        _check_3d(path, image.shape)
        hu = np.asarray(image.dataobj).transpose(2, 1, 0)
    except CTFlowError:
        raise
    except Exception as exc:  # nibabel raises many types for damaged files
        raise CTFlowError(f"cannot read {path}: {exc}") from exc
    provenance = None
    for extension in image.header.extensions:
        try:
            provenance = Provenance.from_dict(json.loads(extension.get_content())["ctflow_provenance"])
        except (ValueError, KeyError, TypeError):
            continue
    geometry = Geometry.from_ijk_to_ras(image.affine)
    return Volume(hu_voxels(hu, path), geometry, provenance)


def _check_3d(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) != 3:
        raise CTFlowError(f"{path} is not a 3-D volume: its voxel array is {len(shape)}-D, {'x'.join(map(str, shape))}")


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
        header["content"] = SYNTHETIC_LABEL
    header.update(_provenance_fields(volume.provenance))
    nrrd.write(str(path), np.ascontiguousarray(volume.hu.transpose(2, 1, 0)).astype(np.int16), header, index_order="F")


def _read_nrrd(path: Path) -> Volume:
    import nrrd

    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as exc:  # pynrrd raises several types for damaged files
        raise CTFlowError(f"cannot read {path}: {exc}") from exc
    _check_3d(path, data.shape)
    if "space directions" not in header:
        raise CTFlowError(f"{path} has no 'space directions' (a NRRD without orientation): ctflow reads NRRDs that "
                          "place their voxels in space, as Slicer and ctflow write them")
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(header["space directions"], dtype=float).T
    matrix[:3, 3] = np.asarray(header.get("space origin", [0.0, 0.0, 0.0]), dtype=float)
    space = header.get("space", "left-posterior-superior")  # Slicer's and ITK's frame when none is named
    if space not in _NRRD_TO_RAS:
        raise CTFlowError(f"{path} places its voxels in NRRD space {space!r}, not a patient frame: ctflow reads "
                          "right-anterior-superior, left-posterior-superior and left-anterior-superior")
    matrix = _NRRD_TO_RAS[space] @ matrix
    provenance = _provenance_from_fields(header)
    return Volume(hu_voxels(np.asarray(data).transpose(2, 1, 0), path), Geometry.from_ijk_to_ras(matrix), provenance)


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
    """The provenance of a NRRD or MetaImage header; None without one, or with a damaged one (as NIfTI and
    DICOM read it: the voxels are still the file's)."""
    try:
        fields = {
            key[len(_FIELD_PREFIX) :]: value.encode("ascii").decode("unicode_escape")
            for key, value in header.items()
            if key.startswith(_FIELD_PREFIX)
        }
        return Provenance.from_dict(fields) if fields else None
    except (ValueError, TypeError, AttributeError):  # a partial set, a number that is not one, a non-ASCII value
        return None

