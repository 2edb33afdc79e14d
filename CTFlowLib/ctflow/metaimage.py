"""MetaImage (.mha): the file type of grand-challenge.org, so of the VLM3D text-to-CT challenge's evaluation.

One file: a text header (key = value lines, positions in LPS like ITK's) and the voxels after
`ElementDataFile = LOCAL`, zlib-compressed. Provenance goes in extra header keys, which ITK keeps as metadata.
Reading accepts what ITK/SimpleITK write for a 3D scalar image; detached data (.mhd/.raw) is not read.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .errors import CTFlowError
from .volume import RAS_TO_LPS, Geometry, Volume, hu_voxels

ELEMENT_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
                 "MET_UINT": "u4", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
DATA_KEY = "ElementDataFile"


def write_mha(volume: Volume, path: Path, fields: dict[str, str]) -> None:
    """Write int16 HU and the geometry; `fields` are extra one-line header entries (provenance)."""
    direction = np.asarray(volume.geometry.direction, dtype=float) * RAS_TO_LPS[:, None]  # columns: LPS of i, j, k
    data = zlib.compress(np.ascontiguousarray(volume.hu, dtype="<i2").tobytes(), 6)
    k, j, i = volume.shape
    header = {
        "ObjectType": "Image", "NDims": "3", "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
        "CompressedData": "True", "CompressedDataSize": str(len(data)),
        "TransformMatrix": _numbers(direction.T.ravel()),  # one axis after the other
        "Offset": _numbers(np.asarray(volume.geometry.origin, dtype=float) * RAS_TO_LPS),
        "CenterOfRotation": "0 0 0", "ElementSpacing": _numbers(volume.geometry.spacing),
        **fields,
        "DimSize": f"{i} {j} {k}", "ElementType": "MET_SHORT", DATA_KEY: "LOCAL",
    }
    text = "".join(f"{key} = {value}\n" for key, value in header.items())
    path.write_bytes(text.encode("ascii") + data)


def read_mha(path: Path) -> tuple[Volume, dict[str, str]]:
    """The volume (provenance None) and every header entry, for the caller to find its provenance in."""
    raw = path.read_bytes()
    header, start = {}, 0
    while DATA_KEY not in header:
        end = raw.find(b"\n", start)
        if end < 0:
            raise CTFlowError(f"cannot read {path}: no {DATA_KEY} line (not a MetaImage file?)")
        key, _, value = raw[start:end].decode("latin-1").partition("=")
        header[key.strip()] = value.strip()
        start = end + 1
    try:
        volume = _volume(header, raw[start:], path)
    except (KeyError, ValueError, zlib.error) as exc:
        raise CTFlowError(f"cannot read {path}: {exc}") from exc
    return volume, header


def _volume(header: dict[str, str], data: bytes, path: Path) -> Volume:
    if header[DATA_KEY] != "LOCAL":
        raise ValueError(f"the voxels are in a separate file ({header[DATA_KEY]}): only single-file .mha is read")
    if header.get("NDims") != "3" or int(header.get("ElementNumberOfChannels", 1)) != 1:
        raise ValueError("not a 3-D volume (only 3-D single-channel images are read)")
    if header.get("CompressedData", "False") == "True":
        data = zlib.decompress(data)
    order = ">" if header.get("BinaryDataByteOrderMSB", header.get("ElementByteOrderMSB", "False")) == "True" else "<"
    i, j, k = (int(v) for v in header["DimSize"].split())
    values = np.frombuffer(data, dtype=order + ELEMENT_TYPES[header["ElementType"]], count=i * j * k)
    hu = hu_voxels(values.reshape(k, j, i), path)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(header.get("TransformMatrix", "1 0 0 0 1 0 0 0 1").split(), dtype=float).reshape(3, 3).T
    matrix[:3, :3] *= np.array(header.get("ElementSpacing", "1 1 1").split(), dtype=float)
    matrix[:3, 3] = np.array(header.get("Offset", header.get("Position", "0 0 0")).split(), dtype=float)
    return Volume(hu, Geometry.from_ijk_to_ras(np.diag([*RAS_TO_LPS, 1.0]) @ matrix), None)


def _numbers(values) -> str:
    return " ".join(repr(float(v) + 0.0) for v in values)
