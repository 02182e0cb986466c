#!/usr/bin/env python3
"""Write the TensorRT Python API surface files the tests check the code against (no GPU needed).

TensorRT's Python bindings wheels (``tensorrt-cu12-bindings`` / ``tensorrt-cu13-bindings``, ~1 MB)
cannot be imported without libnvinfer, but their pybind11 module ``tensorrt_bindings/tensorrt.so``
holds every bound class, method, property and enum-member name as a C string, and the wheel's
``__init__.py`` holds the pure-Python helpers (``nptype``, ``volume``...). This script reads those
and records, for every TensorRT name edge_ad's code or its test stubs use (:data:`CANDIDATES`),
whether that version has it. The files are small, committed (``tests/data/trt_surface_<v>.json``)
and regenerated with::

    python scripts/trt_api_surface.py                       # downloads the three wheels with pip
    python scripts/trt_api_surface.py --wheels DIR          # or reads *.whl from DIR

How a name is decided present:

* the linker merges a short string into the tail of a longer one (``set_output_type`` lives
  inside ``reset_output_type``, ``float16`` at the end of a docstring), so a name counts when it
  is the *suffix* of the trailing identifier of one of the module's strings;
* a suffix cannot tell which enum a member belongs to (``INT8`` is also the tail of
  ``DataType.UINT8``), so a candidate may name its pybind11 docstring as extra evidence
  (``BuilderFlag.INT8``: "Enable Int8 layer selection"), which must then be present too;
* the owner class must be present as well (same suffix rule);
* ``nptype`` etc. are top-level functions of the wheel's ``__init__.py`` (read with ``ast``).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "data"

#: (pip requirement, surface label, pip platform tag) of the versions the tests run against:
#: JetPack 6 (10.3), the latest 10.x (JetPack 7 / x86), the latest 11.x.
WHEELS: tuple[tuple[str, str, str], ...] = (
    ("tensorrt-cu12-bindings==10.3.0", "10.3", "manylinux_2_17_x86_64"),
    ("tensorrt-cu12-bindings==10.16.1.11", "10.16", "manylinux_2_28_x86_64"),
    ("tensorrt-cu13-bindings==11.4.0.106", "11.4", "manylinux_2_28_x86_64"),
)

#: Docstring evidence for names whose suffix match is ambiguous (see the module docstring).
DOC_EVIDENCE: dict[str, str] = {
    "BuilderFlag.FP16": "Enable FP16 layer selection",
    "BuilderFlag.INT8": "Enable Int8 layer selection",
}


def _members(owner: str, names: str) -> list[str]:
    return [f"{owner}.{n}" for n in names.split()]


#: Every TensorRT name used by edge_ad (converters/tensorrt.py, runtime/engines/tensorrt_engine.py)
#: or by the test stubs. ``Owner.member`` or a module-level name.
CANDIDATES: tuple[str, ...] = tuple(
    ["Logger", "Builder", "OnnxParser", "Runtime", "ParserError", "ILayer", "IElementWiseLayer", "ITensor",
     "INetworkDefinition", "IBuilderConfig", "ITimingCache", "ICudaEngine", "IExecutionContext", "DataType",
     "LayerType", "ElementWiseOperation", "BuilderFlag", "NetworkDefinitionCreationFlag", "MemoryPoolType",
     "DeviceType", "TensorIOMode", "float32", "float16", "int8", "int32", "int64", "bool", "nptype"]
    + _members("Logger", "VERBOSE WARNING")
    + _members("Builder", "create_network create_builder_config build_serialized_network num_DLA_cores")
    + _members("OnnxParser", "parse_from_file num_errors get_error")
    + _members("ParserError", "node node_name node_operator desc")
    + _members("INetworkDefinition", "num_layers num_inputs get_layer get_input")
    + _members("ILayer", "name type num_inputs num_outputs get_input get_output precision set_output_type")
    + _members("IElementWiseLayer", "op")
    + _members("ITensor", "name dtype shape")
    + _members("IBuilderConfig", "set_flag set_memory_pool_limit create_timing_cache set_timing_cache "
                                 "get_timing_cache default_device_type DLA_core builder_optimization_level")
    + _members("ITimingCache", "serialize")
    + _members("Runtime", "deserialize_cuda_engine DLA_core")
    + _members("ICudaEngine", "num_io_tensors get_tensor_name get_tensor_shape get_tensor_dtype "
                              "get_tensor_mode create_execution_context")
    + _members("IExecutionContext", "set_tensor_address execute_async_v3")
    + _members("DataType", "FLOAT HALF INT8 INT32 INT64 BOOL")
    + _members("LayerType", "NORMALIZATION SOFTMAX MATRIX_MULTIPLY CONVOLUTION QUANTIZE DEQUANTIZE CONSTANT "
                            "SHUFFLE SHAPE GATHER SLICE CONCATENATION CAST IDENTITY TOPK REDUCE RESIZE PADDING "
                            "UNARY SELECT FILL ACTIVATION ELEMENTWISE")
    + _members("ElementWiseOperation", "SUM SUB PROD DIV POW MAX MIN EQUAL")
    + _members("BuilderFlag", "FP16 INT8 OBEY_PRECISION_CONSTRAINTS GPU_FALLBACK")
    + _members("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH STRONGLY_TYPED")
    + _members("MemoryPoolType", "WORKSPACE")
    + _members("DeviceType", "GPU DLA")
    + _members("TensorIOMode", "INPUT OUTPUT")
)

_TAIL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


def module_strings(so_bytes: bytes) -> tuple[list[str], str]:
    """(identifier-like tails of the module's C strings, all its printable text) of a compiled module.

    The tail is the last identifier of each string (``reset_output_type`` of itself, ``DataType``
    of a docstring whose last word is ``DataType``), so names merged into either are found.
    """
    texts = [s.decode("ascii") for s in re.findall(rb"[\x20-\x7e]{2,}", so_bytes)]
    tails = {m.group(0) for t in texts if (m := _TAIL.search(t))}
    return sorted(tails), "\n".join(texts)


def python_helpers(init_source: str) -> list[str]:
    """Top-level public function names of the wheel's ``__init__.py`` (``nptype``, ``volume``...)."""
    tree = ast.parse(init_source)
    return sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_"))


def has_name(name: str, idents: list[str]) -> bool:
    """Whether ``name`` is an identifier string of the module or the merged tail of one."""
    return any(s.endswith(name) for s in idents)


def surface_of(wheel: Path, label: str) -> dict:
    """The surface record of one bindings wheel."""
    with zipfile.ZipFile(wheel) as z:
        so = next(n for n in z.namelist() if re.search(r"tensorrt_bindings/tensorrt[^/]*\.so$", n))
        idents, text = module_strings(z.read(so))
        helpers = python_helpers(z.read("tensorrt_bindings/__init__.py").decode())
        version = re.search(r'__version__ = "([^"]+)"', z.read("tensorrt_bindings/__init__.py").decode()).group(1)
    present: dict[str, bool] = {}
    for cand in CANDIDATES:
        parts = cand.split(".")
        if len(parts) == 1:
            ok = cand in helpers or has_name(cand, idents)
        else:
            ok = has_name(parts[0], idents) and has_name(parts[1], idents)
        if cand in DOC_EVIDENCE:
            ok = ok and DOC_EVIDENCE[cand] in text
        present[cand] = ok
    return {
        "label": label,
        "version": version,
        "wheel": wheel.name,
        "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "python_helpers": helpers,
        "present": sorted(n for n, ok in present.items() if ok),
        "absent": sorted(n for n, ok in present.items() if not ok),
    }


def _download(requirement: str, platform: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
           "--platform", platform, "-d", str(dest), requirement]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    name, version = requirement.split("==")
    return next(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, help="folder holding the wheels (default: download with pip)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, label, platform in WHEELS:
            name, version = requirement.split("==")
            if args.wheels is not None:
                found = sorted(args.wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
                if not found:
                    raise SystemExit(f"no {requirement} wheel in {args.wheels}: download it with `pip download "
                                     f"--no-deps --only-binary=:all: --platform {platform} {requirement}`")
                wheel = found[0]
            else:
                wheel = _download(requirement, platform, Path(tmp))
            surface = surface_of(wheel, label)
            path = args.out / f"trt_surface_{label}.json"
            path.write_text(json.dumps(surface, indent=1) + "\n")
            print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: TensorRT {surface['version']}, "
                  f"{len(surface['present'])} names present, absent: {', '.join(surface['absent']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
