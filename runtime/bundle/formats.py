"""The allow-list of what a bundle may hold: every artifact is one of a few types, each checked by
parsing its real format, at write and at load. Anything else is refused, whatever it contains.

=================  =============================================================================
type               accepted when
=================  =============================================================================
``*.onnx``         a well-formed ONNX ModelProto (:mod:`.onnx_wire`); every external-data
                   location it names is a listed artifact beside it, and each tensor's byte range
                   lies inside that artifact
``*.xml``          OpenVINO IR: XML without DTD / entities whose root is ``<net>``; the ``.bin`` of
                   the same name is listed when the IR has weights, and every ``Const`` layer's
                   ``offset + size`` lies inside it
``*.bin``, other   raw weights only: the ``.bin`` of a listed IR, or external data of a listed
                   ONNX model; never a pickle stream or a zip archive
``*.json``         UTF-8 JSON (no NaN / Infinity)
``*.npy``          ``numpy.load(allow_pickle=False)`` opens it (no object dtype) and the header's
                   shape accounts for every byte of the file
``*.safetensors``  the safetensors header (JSON) is valid and its tensors tile the data exactly
=================  =============================================================================

Pickles are refused first, with their own message, whatever the name (protocol 0 to 5 by opcode
parsing, see :func:`_is_pickle_stream`); compressed or archived files (``.pkl.gz``,
``.npz``, ``.zip``) are not on the list at all, so a pickle cannot hide inside one.
"""
from __future__ import annotations

import json
import os
import posixpath
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from .onnx_wire import OnnxFormatError, read_onnx_external_data
from .schema import BundleError

#: Artifact types by suffix (lower case) -> what they are; everything else must be referenced raw weights.
ALLOWED_TYPES: dict[str, str] = {
    ".onnx": "ONNX model",
    ".xml": "OpenVINO IR (its weights: the .bin of the same name)",
    ".json": "JSON",
    ".npy": "numpy array without object dtype",
    ".safetensors": "safetensors tensors",
}
_FIX = ("bundles hold only ONNX, OpenVINO IR (.xml + .bin), JSON, .npy and .safetensors artifacts "
        "(and the external data of a listed ONNX model); re-export with edge-ad convert")
_SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                       "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB too


def check_artifact_formats(root: Path, sizes: Mapping[str, int], label: str) -> None:
    """Check every listed artifact (``name -> bytes``) under ``root`` against the allow-list.

    Raises:
        BundleError: naming the artifact, what it is not, and the fix.
    """
    weights: dict[str, str] = {}  # raw-weight artifact -> who references it
    for name in sizes:
        if _is_pickle_stream(root / name):
            raise BundleError(f"bundle {label}: artifact {name!r} is a Python pickle (it parses as pickle "
                              "opcodes); bundles never hold pickles (loading one runs code); " + _FIX)
    for name in sorted(sizes):
        suffix = PurePosixPath(name).suffix.lower()
        path = root / name
        try:
            if suffix == ".onnx":
                for ref in _check_onnx(path, name, sizes):
                    weights.setdefault(ref, f"external data of {name!r}")
            elif suffix == ".xml":
                ref = _check_openvino_xml(path, name, sizes)
                if ref is not None:
                    weights.setdefault(ref, f"weights of {name!r}")
            elif suffix == ".json":
                _check_json(path)
            elif suffix == ".npy":
                _check_npy(path)
            elif suffix == ".safetensors":
                _check_safetensors(path)
        except BundleError as e:
            raise BundleError(f"bundle {label}: artifact {name!r}: {e}") from None
    for name in sorted(sizes):
        if PurePosixPath(name).suffix.lower() in ALLOWED_TYPES:
            continue
        if name not in weights:
            kind = PurePosixPath(name).suffix or "(no suffix)"
            raise BundleError(f"bundle {label}: artifact {name!r} has type {kind}, which no listed model "
                              f"references; {_FIX}")
        _check_raw_weights(root / name, name, label)


_PICKLE_WINDOW = 1 << 20
_PICKLE_IMPORT_OPS = frozenset({"GLOBAL", "STACK_GLOBAL"})


def _is_pickle_stream(path: Path) -> bool:
    """Whether ``path`` holds a protocol 2+ pickle (PyTorch, joblib, numpy object arrays, ...).

    Cheap for everything else: only files starting with PROTO (0x80) and a protocol number 2..5 are
    parsed, with :mod:`pickletools` (which decodes opcodes and never executes anything), within a
    1 MiB window. It is a pickle when either

    * the window holds a complete, stack-consistent pickle (``pickletools.dis``) that has at least
      8 opcodes, ends the file, or is followed by another pickle (legacy ``torch.save``); or
    * at least 8 opcodes parse and one imports a global (a pickle larger than the window).

    Raw weights that happen to start with 0x80 0x02..0x05 (OpenVINO ``.bin``) fail both: on random
    data the rate is below 1e-9.
    """
    import pickletools

    with open(path, "rb") as f:
        window = f.read(_PICKLE_WINDOW)
        size = os.fstat(f.fileno()).st_size
    if len(window) < 2 or window[0] != 0x80 or not 2 <= window[1] <= 5:
        return False
    names: list[str] = []
    stop = None
    try:
        for op, _arg, pos in pickletools.genops(window):
            names.append(op.name)
            if op.name == "STOP":
                stop = pos
                break
    except Exception:  # unknown opcode, or an argument running past the window
        pass
    if len(names) >= 8 and _PICKLE_IMPORT_OPS.intersection(names):
        return True
    if stop is None:
        return False
    try:
        pickletools.dis(window[: stop + 1], out=_NullWriter())
    except Exception:
        return False
    rest = window[stop + 1 : stop + 3]
    return len(names) >= 8 or stop + 1 == size or (len(rest) == 2 and rest[0] == 0x80 and 2 <= rest[1] <= 5)


class _NullWriter:
    """A text sink for ``pickletools.dis`` (its listing is not needed, only whether it parses)."""

    def write(self, text: str) -> int:
        return len(text)


def _check_onnx(path: Path, name: str, sizes: Mapping[str, int]) -> list[str]:
    try:
        refs = read_onnx_external_data(path)
    except OnnxFormatError as e:
        raise BundleError(f"not an ONNX protobuf ({e}); re-export it with torch.onnx.export / onnx.save") from None
    here = posixpath.dirname(name)
    out = []
    for ref in refs:
        loc = ref.location
        if loc.startswith("/") or "\\" in loc or ".." in loc.split("/") or not loc.strip():
            raise BundleError(f"tensor {ref.tensor!r} has external data at {loc!r}, outside the bundle; "
                              "re-export with the data file beside the model")
        target = posixpath.normpath(posixpath.join(here, loc))
        if target not in sizes:
            raise BundleError(
                f"tensor {ref.tensor!r} reads external data from {target!r}, which the manifest does not list "
                "(unlisted data is not checksummed); pass it to write_bundle with the model"
            )
        end = ref.offset + (ref.length or 0)
        if end > sizes[target]:
            raise BundleError(f"tensor {ref.tensor!r} reads bytes {ref.offset}..{end} of {target!r}, which has "
                              f"{sizes[target]}; re-export the model")
        out.append(target)
    return out


def _check_openvino_xml(path: Path, name: str, sizes: Mapping[str, int]) -> str | None:
    import xml.etree.ElementTree as ET

    data = path.read_bytes()
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise BundleError("XML with a DTD / entities is refused (OpenVINO IR has none); re-export it with "
                          "openvino.save_model")
    try:
        net = ET.fromstring(data)
    except ET.ParseError as e:
        raise BundleError(f"not XML ({e}); re-export it with openvino.save_model") from None
    if net.tag != "net":
        raise BundleError(f"not an OpenVINO IR (root <{net.tag}>, expected <net>); re-export it")
    weights = str(PurePosixPath(name).with_suffix(".bin"))
    ranges = []
    for layer in net.iter("layer"):
        if layer.get("type", "").lower() != "const":
            continue
        data_el = layer.find("data")
        if data_el is None or data_el.get("offset") is None:
            continue
        try:
            ranges.append((int(data_el.get("offset", "")), int(data_el.get("size", "")), layer.get("name", "")))
        except ValueError:
            raise BundleError(f"Const layer {layer.get('name')!r} has a non-integer offset / size") from None
    if weights not in sizes:
        if ranges:
            raise BundleError(f"its weights {weights!r} are not listed; pass the .bin to write_bundle with the .xml")
        return None
    for offset, size, layer_name in ranges:
        if offset < 0 or size < 0 or offset + size > sizes[weights]:
            raise BundleError(f"Const layer {layer_name!r} reads bytes {offset}..{offset + size} of {weights!r}, "
                              f"which has {sizes[weights]}; re-export the IR")
    return weights


def _check_json(path: Path) -> None:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    try:
        json.loads(path.read_bytes().decode("utf-8"), parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"not valid JSON ({e})") from None


def _check_npy(path: Path) -> None:
    import numpy as np

    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # object dtype, bad magic, short file: numpy's message says which
        raise BundleError(f"not a plain .npy ({type(e).__name__}: {e}); write it with numpy.save from a numeric "
                          "array") from None
    if not isinstance(array, np.memmap) or array.offset + array.nbytes != path.stat().st_size:
        raise BundleError("the .npy holds bytes beyond its array; write it with numpy.save")


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BundleError("not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise BundleError(f"not a safetensors file (header length {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise BundleError(f"safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise BundleError("safetensors header is not a JSON object")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise BundleError("safetensors __metadata__ must map strings to strings")
            continue
        try:
            itemsize = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = [int(d) for d in entry["shape"]]
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"safetensors tensor {key!r} has no valid dtype / shape / data_offsets") from None
        count = 1
        for d in shape:
            if d < 0:
                raise BundleError(f"safetensors tensor {key!r} has a negative dimension")
            count *= d
        if end - begin != count * itemsize:
            raise BundleError(f"safetensors tensor {key!r}: {end - begin} bytes for shape {shape} {entry['dtype']}")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise BundleError("safetensors tensors overlap or leave gaps in the data")
        position = end
    if 8 + n + position != size:
        raise BundleError(f"safetensors data is {size - 8 - n} bytes, its tensors cover {position}")


def _check_raw_weights(path: Path, name: str, label: str) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.namelist()
        except zipfile.BadZipFile:
            return  # raw floats that merely start with the zip magic: nothing can unpack them
        raise BundleError(f"bundle {label}: artifact {name!r} is a zip archive ({len(members)} member(s), e.g. "
                          f"{members[:1]}), not raw weights; {_FIX}")
