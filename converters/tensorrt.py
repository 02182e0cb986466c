"""TensorRT engines: cache keys, build options, FP32 islands and the engine builder.

Importing this module never needs TensorRT; the functions that do raise :class:`ImportError`
with :data:`TENSORRT_MISSING` (what to install, and that engines are built on the device).

Checked against the real Python API surfaces of TensorRT 10.3 (JetPack 6), the latest 10.x
(10.16; JetPack 7 ships 10.13) and 11.4 (``scripts/trt_api_surface.py``, ``tests/data/``); the
< 10 branch (8.6, JetPack 6.0) is kept but not checked against a surface:

* explicit batch networks (the only kind in 10; the ``EXPLICIT_BATCH`` flag for < 10; the flag
  is gone in 11);
* TensorRT 10 FP16: ``BuilderFlag.FP16`` plus FP32 *islands* - LayerNorm / normalisation,
  Softmax, residual ``Add``\\ s and the detector's score head get ``layer.precision = float32``
  and FP32 output types, enforced with ``OBEY_PRECISION_CONSTRAINTS`` (FP16 LayerNorm variance and
  FP16 residual streams are where ViTs lose accuracy; FoundAD's score ``|f - P(f)|^2`` subtracts
  two close numbers). Which islands is a preset (:data:`FP32_PRESETS`, ``--fp32-layers``): Softmax
  in FP32 can keep TensorRT from its fused FP16 attention kernels, so ``no-softmax`` is offered
  and measured, not assumed. Only layers whose inputs and outputs are all floating point are
  constrained (shape arithmetic on INT32 / INT64 also matches the residual-add rule);
* INT8 only by explicit quantization: a Q/DQ ONNX from :func:`edge_ad.converters.qdq.quantize_qdq`
  built with ``INT8`` + ``FP16`` (layers without Q/DQ run FP16, with the same FP32 islands). The
  implicit INT8 calibrator (``IInt8EntropyCalibrator2``) is deprecated in TensorRT 10 and removed
  in 11, so it is not offered;
* TensorRT >= 11: networks are strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``),
  the precision flags and per-layer precisions are gone, and tensor types come from the ONNX
  itself. FP16 builds convert the FP32 ONNX first (:func:`edge_ad.converters.fp16.convert_fp16`:
  FP16 graph, the same FP32 islands as casts); INT8 builds parse the Q/DQ ONNX as it is (the
  layers outside Q/DQ then run in FP32);
* Jetson DLA: FP16 only here. TensorRT 10's DLA does not take explicit quantization (Q/DQ), so
  INT8 with a DLA core is refused, and no FP32 islands are forced on the DLA (each island splits
  the graph, and a DLA core holds at most 16 loadables); ``GPU_FALLBACK`` runs what DLA cannot.

Engines are specific to the TensorRT version and the GPU (compute capability, and the module:
Orin Nano, NX and AGX all report 8.7, so the device name and SM count are in the key too) and,
for Jetson's DLA, to the DLA core; :func:`engine_cache_key` hashes all of that with the ONNX
bytes and the build options, and :func:`find_cached_engine` returns only an engine whose recorded key matches,
so a stale or foreign engine is rebuilt, never loaded.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "DEFAULT_FP32_PATTERNS",
    "FP32_PRESETS",
    "PRECISIONS",
    "TENSORRT_MISSING",
    "BuildOptions",
    "DeviceInfo",
    "EngineKey",
    "LayerDesc",
    "build_engine",
    "device_info",
    "engine_cache_key",
    "engine_filename",
    "device_engine_key",
    "engine_key",
    "find_cached_engine",
    "get_or_build_engine",
    "select_fp32_layers",
    "tensorrt_available",
    "write_engine_record",
]

log = logging.getLogger(__name__)

TENSORRT_MISSING = (
    "TensorRT is not installed: on Jetson it comes with JetPack (`sudo apt install python3-libnvinfer`, never pip); "
    "on x86 `pip install edge-ad[tensorrt]` (TensorRT 10 for CUDA 12); build engines on the device with "
    "`edge-ad build-engine BUNDLE` (docs/JETSON.md)"
)

#: Engine precisions: ``fp32``; ``fp16`` (with FP32 islands); ``int8`` (Q/DQ ONNX only, the rest FP16).
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")

#: Version of the cache-key layout; bump it when the key's meaning changes (old engines rebuild).
#: 2: device name and SM count joined the key.
KEY_SCHEMA = 2

#: FP32-island presets (``BuildOptions.fp32_layers``, ``edge-ad build-engine --fp32-layers``): which
#: of :func:`select_fp32_layers`' rules apply. ``default`` keeps all four; ``no-softmax`` lets
#: TensorRT use its fused FP16 attention (Softmax inside an FP32 island blocks it on ViTs);
#: ``head`` keeps only the detector's score head; ``none`` constrains nothing (what DLA builds use).
FP32_PRESETS: dict[str, frozenset[str]] = {
    "default": frozenset({"normalisation", "softmax", "residual add", "score head"}),
    "no-softmax": frozenset({"normalisation", "residual add", "score head"}),
    "head": frozenset({"score head"}),
    "none": frozenset(),
}

#: Layer-name patterns (``re.search``, case-insensitive) kept FP32, with the reason reported.
#: TensorRT's ONNX parser names a layer after its ONNX node; ``torch.onnx.export`` names nodes
#: ``/module/path/Op``. Normalisations decomposed into Reduce / Pow / Sqrt layers (RMSNorm,
#: LayerNorm before opset 17) are caught by name; ``/Op`` at the top level are the ops of the
#: detector's own forward (FoundAD: ``f - P(f)``, pow, mean, top-k), ``smoother`` and
#: ``normalizer`` its head modules (``edge_ad.methods.base.AnomalyDetector``).
DEFAULT_FP32_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|/)(norm\d*|[a-z_]*norm|ln_?\d*)(/|$)", "normalisation"),
    (r"softmax", "softmax"),
    (r"^/[^/]+$", "score head"),
    (r"^/(smoother|normalizer)/", "score head"),
)

# Layer types that never get a precision constraint: data movement, shape arithmetic and the
# Q/DQ layers themselves (constraining those would break explicit quantization).
_NO_PRECISION_TYPES = frozenset(
    {"CONSTANT", "SHAPE", "SHUFFLE", "CONCATENATION", "SLICE", "GATHER", "IDENTITY", "CAST",
     "QUANTIZE", "DEQUANTIZE", "ASSERTION", "CONDITION", "CONDITIONAL_INPUT", "CONDITIONAL_OUTPUT",
     "FILL", "ITERATOR", "LOOP_OUTPUT", "RECURRENCE", "TRIP_LIMIT", "PADDING", "SCATTER", "PLUGIN",
     "PLUGIN_V2", "PLUGIN_V3", "NON_ZERO", "ONE_HOT", "RESIZE"}
)


# ---------------------------------------------------------------------------- TensorRT import
def _import_tensorrt() -> Any:
    """The ``tensorrt`` module, or ImportError with :data:`TENSORRT_MISSING`.

    Imported on every call (not at module import) so that this module loads on machines without
    TensorRT, and so that tests can put a stub into ``sys.modules``.
    """
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # ModuleNotFoundError, or a broken install failing to load libnvinfer
        raise ImportError(TENSORRT_MISSING) from exc
    if not hasattr(trt, "Builder"):  # e.g. the PyPI download stub without its wheel
        raise ImportError(f"{TENSORRT_MISSING} (the importable 'tensorrt' has no Builder)")
    return trt


def tensorrt_available() -> bool:
    """Whether a usable ``tensorrt`` module can be imported."""
    try:
        _import_tensorrt()
    except ImportError:
        return False
    return True


def _major(version: str) -> int:
    match = re.match(r"\s*(\d+)", str(version))
    if not match:
        raise ValueError(f"cannot read a major version from TensorRT version {version!r}")
    return int(match.group(1))


# ---------------------------------------------------------------------------- device
class DeviceInfo(NamedTuple):
    """What an engine is specific to.

    Attributes:
        trt_version: ``tensorrt.__version__``, e.g. ``"10.3.0"``.
        compute_capability: ``"major.minor"``, e.g. ``"8.7"`` (Jetson Orin), ``"8.9"`` (L4).
        device_name: CUDA device name, e.g. ``"Orin"``, ``"NVIDIA L4"`` ("" = unknown).
        sm_count: streaming multiprocessors (Orin Nano 8 GB: 8, NX 16 GB: 8, AGX 64 GB: 16; 0 = unknown).
    """

    trt_version: str
    compute_capability: str
    device_name: str = ""
    sm_count: int = 0


def device_info(device: int = 0) -> DeviceInfo:
    """TensorRT version, compute capability, name and SM count of CUDA device ``device``.

    The device is queried through :func:`edge_ad.runtime.cuda.load_cuda` (cuda-python, else
    pycuda: the first binding whose first CUDA call works).

    Raises:
        ImportError: TensorRT, or both CUDA bindings, missing (the message says what to install).
        RuntimeError: no CUDA device / no binding can use it (``CudaError`` names each attempt).
    """
    from edge_ad.runtime.cuda import load_cuda

    trt = _import_tensorrt()
    cuda = load_cuda(device)
    try:
        props = cuda.device_properties()
    finally:
        cuda.close()
    return DeviceInfo(str(trt.__version__), props.compute_capability, props.name, props.sm_count)


# ---------------------------------------------------------------------------- cache keys
def _normalize_cc(value: Any) -> str:
    """``"8.7"`` from ``"8.7"``, ``(8, 7)``, ``"sm_87"`` or ``"sm87"``."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+\.\d+", text):
        major, minor = text.split(".")
        return f"{int(major)}.{int(minor)}"
    match = re.fullmatch(r"sm_?(\d+)(\d)", text)
    if match:
        return f"{int(match.group(1))}.{int(match.group(2))}"
    raise ValueError(f"compute capability must look like '8.7', (8, 7) or 'sm_87', got {value!r}")


def _sha256_of(onnx: bytes | bytearray | str | Path) -> str:
    h = hashlib.sha256()
    if isinstance(onnx, (bytes, bytearray, memoryview)):
        h.update(onnx)
    else:
        with open(onnx, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _canonical(value: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace); rejects what JSON cannot say exactly."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; :meth:`digest` is the cache key.

    Attributes:
        onnx_sha256: sha256 of the ONNX file's bytes.
        trt_version: TensorRT version string (engines do not load across versions).
        compute_capability: ``"major.minor"`` of the GPU built for.
        precision: one of :data:`PRECISIONS`.
        dla_core: Jetson DLA core, or None for the GPU.
        extra: canonical JSON of further build settings (see :meth:`BuildOptions.key_fields`).
        device_name: CUDA device name (Orin Nano / NX / AGX share compute capability 8.7).
        sm_count: streaming multiprocessors of the device.
        schema: :data:`KEY_SCHEMA`.
    """

    onnx_sha256: str
    trt_version: str
    compute_capability: str
    precision: str
    dla_core: int | None = None
    extra: str = "{}"
    device_name: str = ""
    sm_count: int = 0
    schema: int = KEY_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """64 hex digits: sha256 of the canonical JSON of every field."""
        return hashlib.sha256(_canonical(self.to_dict()).encode()).hexdigest()


def engine_key(
    onnx_bytes_or_path: bytes | str | Path,
    *,
    trt_version: str,
    compute_capability: str | Sequence[int],
    precision: str,
    dla_core: int | None = None,
    extra: Mapping[str, Any] | None = None,
    device_name: str = "",
    sm_count: int = 0,
) -> EngineKey:
    """The :class:`EngineKey` of an ONNX model (bytes or file) built with these settings."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if not str(trt_version).strip():
        raise ValueError("trt_version must be a non-empty version string")
    if dla_core is not None and (int(dla_core) != dla_core or dla_core < 0):
        raise ValueError(f"dla_core must be a non-negative int or None, got {dla_core!r}")
    if isinstance(sm_count, bool) or int(sm_count) != sm_count or sm_count < 0:
        raise ValueError(f"sm_count must be a non-negative int, got {sm_count!r}")
    return EngineKey(
        onnx_sha256=_sha256_of(onnx_bytes_or_path),
        trt_version=str(trt_version).strip(),
        compute_capability=_normalize_cc(compute_capability),
        precision=precision,
        dla_core=None if dla_core is None else int(dla_core),
        extra=_canonical(dict(extra or {})),
        device_name=str(device_name).strip(),
        sm_count=int(sm_count),
    )


def device_engine_key(onnx_bytes_or_path: bytes | str | Path, options: "BuildOptions", device: DeviceInfo) -> EngineKey:
    """The :class:`EngineKey` of an ONNX model built with ``options`` on ``device`` (every caller's key)."""
    return engine_key(
        onnx_bytes_or_path, trt_version=device.trt_version, compute_capability=device.compute_capability,
        precision=options.precision, dla_core=options.dla_core, extra=options.key_fields(),
        device_name=device.device_name, sm_count=device.sm_count,
    )


def engine_cache_key(
    onnx_bytes_or_path: bytes | str | Path,
    *,
    trt_version: str,
    compute_capability: str | Sequence[int],
    precision: str,
    dla_core: int | None = None,
    extra: Mapping[str, Any] | None = None,
    device_name: str = "",
    sm_count: int = 0,
) -> str:
    """Stable sha256 cache key (64 hex digits) of an engine; every argument changes it.

    Args:
        onnx_bytes_or_path: the ONNX model, serialized bytes or a file path (hashed by content).
        trt_version: TensorRT version, e.g. ``"10.3.0"``.
        compute_capability: ``"8.7"``, ``(8, 7)`` or ``"sm_87"`` (normalised, so all are equal).
        precision: one of :data:`PRECISIONS`.
        dla_core: DLA core or None (GPU).
        extra: JSON-serialisable further settings (order of keys does not matter).
        device_name: CUDA device name (``"Orin"``...; Jetson modules share a compute capability).
        sm_count: streaming multiprocessors of the device.
    """
    return engine_key(
        onnx_bytes_or_path, trt_version=trt_version, compute_capability=compute_capability,
        precision=precision, dla_core=dla_core, extra=extra, device_name=device_name, sm_count=sm_count,
    ).digest()


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{64}", key):
        raise ValueError(f"an engine cache key is 64 lowercase hex digits, got {key!r}")
    return key


def engine_filename(key: str) -> str:
    """File name of the engine with cache key ``key`` (``<key>.engine``; record ``<key>.json``)."""
    return f"{_check_key(key)}.engine"


def _record_path(engine_path: Path) -> Path:
    return engine_path.with_suffix(".json")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file + rename: a crash never leaves a truncated engine under the name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_engine_record(engine_path: str | Path, key: EngineKey) -> Path:
    """Write ``<engine>.json`` beside an engine: its key fields, digest and the engine's sha256."""
    engine_path = Path(engine_path)
    record = {"key": key.digest(), "fields": key.to_dict(), "engine_sha256": _sha256_of(engine_path)}
    path = _record_path(engine_path)
    _atomic_write(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return path


def find_cached_engine(engines_dir: str | Path, key: str) -> Path | None:
    """The engine built for ``key`` in ``engines_dir``, or None when it must be (re)built.

    An engine file is returned only when its record says it was built for exactly this key (the
    record's fields hash to ``key``) and the file's sha256 matches the record: an engine copied
    from another device, left by an older TensorRT, renamed, or truncated is never loaded.
    """
    _check_key(key)
    path = Path(engines_dir) / engine_filename(key)
    if not path.is_file():
        return None
    try:
        record = json.loads(_record_path(path).read_text())
        fields_digest = EngineKey(**record["fields"]).digest()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("engine %s has no valid record (%s): rebuilding", path, exc)
        return None
    if record.get("key") != key or fields_digest != key:
        log.warning("engine %s was built for another key: rebuilding", path)
        return None
    if record.get("engine_sha256") != _sha256_of(path):
        log.warning("engine %s does not match its recorded checksum (partial or replaced): rebuilding", path)
        return None
    return path


# ---------------------------------------------------------------------------- build options
@dataclass
class BuildOptions:
    """How to build an engine.

    Attributes:
        precision: ``"fp32"``, ``"fp16"`` (FP32 islands) or ``"int8"`` (Q/DQ ONNX; other layers
            FP16 on TensorRT 10, FP32 on 11).
        workspace_mb: builder scratch memory limit (MiB); tactics needing more are skipped.
        timing_cache: file to load tactic timings from and save them to (faster rebuilds);
            None = no persistent cache.
        dla_core: Jetson DLA core to run on (FP16 only: TensorRT's DLA takes no Q/DQ); None = GPU.
        gpu_fallback: with a DLA core, layers DLA cannot run go to the GPU.
        fp32_layers: FP32-island preset of FP16 / INT8 builds, a key of :data:`FP32_PRESETS`
            (``True`` = ``"default"``, ``False`` = ``"none"``); None = ``"default"`` on the GPU,
            ``"none"`` on DLA (islands split a DLA graph into more loadables than a core holds).
        fp32_patterns: ``(regex, reason)`` layer-name patterns kept FP32 besides the layer types.
        builder_optimization_level: TensorRT's 0..5 search effort (None = TensorRT's default, 3).
        verbose: TensorRT logger at VERBOSE instead of WARNING.
    """

    precision: str = "fp16"
    workspace_mb: int = 1024
    timing_cache: str | Path | None = None
    dla_core: int | None = None
    gpu_fallback: bool = True
    fp32_layers: str | bool | None = None
    fp32_patterns: tuple[tuple[str, str], ...] = DEFAULT_FP32_PATTERNS
    builder_optimization_level: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if int(self.workspace_mb) != self.workspace_mb or self.workspace_mb <= 0:
            raise ValueError(f"workspace_mb must be a positive integer (MiB), got {self.workspace_mb!r}")
        self.workspace_mb = int(self.workspace_mb)
        if self.dla_core is not None:
            if int(self.dla_core) != self.dla_core or self.dla_core < 0:
                raise ValueError(f"dla_core must be a non-negative int or None, got {self.dla_core!r}")
            if self.precision == "fp32":
                raise ValueError("DLA runs FP16 or INT8 only; use precision 'fp16' with dla_core")
            if self.precision == "int8":
                raise ValueError(
                    "INT8 on DLA: edge_ad's INT8 models are explicitly quantized (Q/DQ), which TensorRT 10's DLA does "
                    "not take (with GPU fallback the engine would run on the GPU with extra DLA<->GPU switches). "
                    "Build the INT8 bundle for the GPU (leave out --dla-core / use device 'GPU'), or convert "
                    "with --precision fp16 for the DLA"
                )
            self.dla_core = int(self.dla_core)
        preset = self.fp32_layers
        if preset is None:
            preset = "none" if self.dla_core is not None else "default"
        elif isinstance(preset, bool):
            preset = "default" if preset else "none"
        if preset not in FP32_PRESETS:
            raise ValueError(f"fp32_layers must be one of {sorted(FP32_PRESETS)} (or a bool), got {self.fp32_layers!r}")
        if self.dla_core is not None and preset != "none":
            raise ValueError(
                f"fp32_layers={preset!r} with a DLA core: DLA has no FP32, so every FP32 island becomes a GPU segment "
                "and a ViT is cut into more than the 16 loadables a DLA core holds; use fp32_layers='none' on DLA "
                "(the default), or build for the GPU to keep the islands"
            )
        self.fp32_layers = preset
        if self.builder_optimization_level is not None and not 0 <= int(self.builder_optimization_level) <= 5:
            raise ValueError(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level!r}")
        self.fp32_patterns = tuple((str(p), str(r)) for p, r in self.fp32_patterns)
        for pattern, _ in self.fp32_patterns:
            re.compile(pattern)
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)

    def key_fields(self) -> dict[str, Any]:
        """Settings that change the engine (for the cache key's ``extra``); paths and logging do not."""
        return {
            "workspace_mb": self.workspace_mb,
            "gpu_fallback": self.gpu_fallback if self.dla_core is not None else None,
            "fp32_layers": self.fp32_layers,
            "fp32_patterns": [list(p) for p in self.fp32_patterns] if self.fp32_layers != "none" else None,
            "builder_optimization_level": self.builder_optimization_level,
        }


# ---------------------------------------------------------------------------- FP32 islands
@dataclass(frozen=True)
class LayerDesc:
    """What :func:`select_fp32_layers` needs to know about one network layer.

    Attributes:
        name: layer name (TensorRT's ONNX parser uses the ONNX node name).
        type: ``trt.LayerType`` member name, e.g. ``"NORMALIZATION"``, ``"SOFTMAX"``, ``"ELEMENTWISE"``.
        op: for ``ELEMENTWISE`` layers the ``trt.ElementWiseOperation`` name (``"SUM"``, ``"PROD"``...).
        constant_inputs: inputs produced by constants (a bias ``Add`` has one, a residual ``Add`` none).
        float_io: the layer computes on floats: every non-constant input and its first output are
            floating point (False for INT32 / INT64 shape arithmetic; a TopK's index output and
            its constant K do not count).
    """

    name: str
    type: str
    op: str | None = None
    constant_inputs: int = 0
    float_io: bool = True


def select_fp32_layers(
    layers: Iterable[LayerDesc | Sequence[Any]],
    *,
    patterns: Sequence[tuple[str, str]] = DEFAULT_FP32_PATTERNS,
    preset: str = "default",
) -> dict[str, str]:
    """Which layers get an FP32 precision constraint in an FP16 / INT8 build, and why.

    Pure function (no TensorRT): layers are :class:`LayerDesc` or tuples ``(name, type[, op[,
    constant_inputs[, float_io]]])``. Rules, first match wins, each only when ``preset`` (a key of
    :data:`FP32_PRESETS`) includes its reason:

    1. data movement / shape / Q/DQ layers, and layers with a non-float input or output (INT32 /
       INT64 shape arithmetic): never (a constraint there only blocks fusions, breaks explicit
       quantization, or fails: integer layers have no FP32 precision);
    2. ``NORMALIZATION`` (LayerNorm, GroupNorm, ...): "normalisation";
    3. ``SOFTMAX``: "softmax";
    4. ``ELEMENTWISE`` ``SUM`` of two non-constant inputs: "residual add" (a bias add, with one
       constant input, is fused into its GEMM and stays free);
    5. a name matching one of ``patterns``: that pattern's reason (decomposed normalisations,
       the detector's score head).

    Returns:
        ``{layer name: reason}`` in layer order.
    """
    if preset not in FP32_PRESETS:
        raise ValueError(f"preset must be one of {sorted(FP32_PRESETS)}, got {preset!r}")
    rules = FP32_PRESETS[preset]
    compiled = [(re.compile(p, re.IGNORECASE), reason) for p, reason in patterns]
    chosen: dict[str, str] = {}
    for item in layers:
        desc = item if isinstance(item, LayerDesc) else LayerDesc(*item)
        kind = desc.type.upper()
        if kind in _NO_PRECISION_TYPES or not desc.float_io:
            continue
        if kind == "NORMALIZATION":
            reason = "normalisation"
        elif kind == "SOFTMAX":
            reason = "softmax"
        elif kind == "ELEMENTWISE" and (desc.op or "").upper() == "SUM" and desc.constant_inputs == 0:
            reason = "residual add"
        else:
            reason = next((r for p, r in compiled if p.search(desc.name)), None)
        if reason is not None and reason in rules:
            chosen[desc.name] = reason
    return chosen


def _enum_name(value: Any) -> str:
    name = getattr(value, "name", None)
    return str(name if name is not None else value).split(".")[-1]


def _describe_network(trt: Any, network: Any) -> list[LayerDesc]:
    """:class:`LayerDesc` of every layer of a parsed TensorRT network."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer: dict[str, Any] = {}
    for layer in layers:
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer

    def constant(tensor: Any, depth: int = 0) -> bool:
        # The parser turns an ONNX initializer into a CONSTANT layer, often followed by a SHUFFLE
        # (broadcast reshape) or a CAST.
        layer = producer.get(tensor.name) if tensor is not None else None
        if layer is None or depth > 4:
            return False
        kind = _enum_name(layer.type)
        if kind == "CONSTANT":
            return True
        if kind in ("SHUFFLE", "CAST", "IDENTITY") and layer.num_inputs >= 1:
            return constant(layer.get_input(0), depth + 1)
        return False

    float_types = (trt.float32, trt.float16)
    descs = []
    for layer in layers:
        kind = _enum_name(layer.type)
        tensors = [t for t in (layer.get_input(k) for k in range(layer.num_inputs))
                   if t is not None and not constant(t)]  # None: an optional input left out
        tensors += [layer.get_output(0)] if layer.num_outputs else []
        float_io = all(t.dtype in float_types for t in tensors)
        op = None
        n_const = 0
        if kind == "ELEMENTWISE":
            # get_layer() returns the ILayer base class; the subclass exposes .op (the same
            # downcast Polygraphy does).
            try:
                layer.__class__ = trt.IElementWiseLayer
                op = _enum_name(layer.op)
            except (AttributeError, TypeError):  # pragma: no cover - unexpected bindings
                op = None
            n_const = sum(constant(layer.get_input(k)) for k in range(layer.num_inputs))
        descs.append(LayerDesc(layer.name, kind, op, n_const, float_io))
    return descs


def _apply_fp32(trt: Any, network: Any, chosen: Mapping[str, str]) -> int:
    """Set FP32 precision and FP32 float outputs on the chosen layers; returns how many."""
    count = 0
    float_types = (trt.float32, trt.float16)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name not in chosen:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in float_types:  # TopK indices etc. keep their int type
                layer.set_output_type(j, trt.float32)
        count += 1
    return count


# ---------------------------------------------------------------------------- builder
def _parse_errors(parser: Any) -> list[str]:
    """One line per ONNX parser error, with the node index / name / op where TensorRT gives them."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = [f"node {err.node()}"]
        for attr in ("node_name", "node_operator"):  # TensorRT >= 10
            getter = getattr(err, attr, None)
            if getter is not None and getter():
                where.append(str(getter()))
        lines.append(f"{' '.join(where)}: {err.desc()}")
    return lines


def _has_fp16_tensors(trt: Any, network: Any) -> bool:
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        tensors += [layer.get_output(j) for j in range(layer.num_outputs)]
    return any(t.dtype == trt.float16 for t in tensors)


def build_engine(onnx_path: str | Path, options: BuildOptions, out_path: str | Path) -> Path:
    """Build a serialized TensorRT engine from an ONNX file and write it to ``out_path``.

    Run on the device the engine is for (engines do not move between GPUs or TensorRT versions).

    Args:
        onnx_path: static-shape ONNX; for ``int8`` a Q/DQ ONNX from ``quantize_qdq``.
        options: :class:`BuildOptions`.
        out_path: engine file to write (atomically).

    Returns:
        ``out_path`` as a Path.

    Raises:
        ImportError: TensorRT missing.
        ValueError: options and model disagree (INT8 without Q/DQ, Q/DQ without INT8, dynamic
            input shapes, no such DLA core, FP16 on a strongly typed FP32 ONNX).
        RuntimeError: TensorRT failed to parse (node-level messages) or to build the model.
    """
    trt = _import_tensorrt()
    major = _major(trt.__version__)
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model {onnx_path} does not exist")

    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = major >= 11
    if major < 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    elif strongly_typed:
        # TensorRT 11: weak typing (precision flags, layer.precision) is gone; types come from the ONNX.
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    else:
        flags = 0  # TensorRT 10: explicit batch is the only mode; EXPLICIT_BATCH is deprecated
    with tempfile.TemporaryDirectory(prefix="edge_ad_trt_") as tmp:
        network, parser = _parse_onnx(trt, builder, flags, logger, onnx_path)
        if strongly_typed and options.precision == "fp16" and not _has_fp16_tensors(trt, network) \
                and not _layer_types(network) & {"QUANTIZE", "DEQUANTIZE"}:
            # The FP16 graph (FP32 islands as casts) replaces the FP32 one; parsed before tmp goes away.
            from .fp16 import convert_fp16

            conv = convert_fp16(onnx_path, Path(tmp) / "model_fp16.onnx", fp32_layers=options.fp32_layers,
                                patterns=options.fp32_patterns)
            log.info("FP16 ONNX for the strongly typed network: %d FP32 nodes, %d casts", len(conv.fp32_nodes),
                     conv.casts)
            network, parser = _parse_onnx(trt, builder, flags, logger, conv.path)
        return _build_parsed(trt, builder, network, options, onnx_path, out_path, strongly_typed, logger)


def _parse_onnx(trt: Any, builder: Any, flags: int, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """(network, parser) of an ONNX file; the parser is returned because the network refers to it."""
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: external weights resolve beside it
        errors = "\n  ".join(_parse_errors(parser)) or "(no error details)"
        raise RuntimeError(
            f"TensorRT's ONNX parser rejected {onnx_path}:\n  {errors}\n"
            "edge_ad.converters.trt_check.check_tensorrt_compatible explains most of these before a build"
        )
    return network, parser


def _layer_types(network: Any) -> set[str]:
    return {_enum_name(network.get_layer(i).type) for i in range(network.num_layers)}


def _build_parsed(trt: Any, builder: Any, network: Any, options: BuildOptions, onnx_path: Path, out_path: Path,
                  strongly_typed: bool, logger: Any) -> Path:
    """The rest of :func:`build_engine` once the network is parsed: checks, config, build, write."""
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(int(d) < 0 for d in tensor.shape):
            raise ValueError(
                f"input {tensor.name!r} has dynamic shape {tuple(tensor.shape)}: edge_ad builds static-shape "
                "engines; export the ONNX at a fixed batch and size"
            )

    quantized = bool(_layer_types(network) & {"QUANTIZE", "DEQUANTIZE"})
    if options.precision == "int8" and not quantized:
        raise ValueError(
            f"{onnx_path} has no Q/DQ nodes: INT8 engines are built only from explicit-quantization ONNX "
            "(edge_ad.converters.qdq.quantize_qdq); TensorRT's implicit INT8 calibrator is deprecated and not used"
        )
    if quantized and options.precision != "int8":
        raise ValueError(f"{onnx_path} carries Q/DQ (explicit INT8) nodes: build it with precision='int8'")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    if options.builder_optimization_level is not None:
        config.builder_optimization_level = int(options.builder_optimization_level)

    fp32: dict[str, str] = {}
    if strongly_typed:
        if options.precision == "fp16" and not _has_fp16_tensors(trt, network):  # pragma: no cover - converted above
            raise ValueError(f"the strongly typed network of {onnx_path} has no FP16 tensors after conversion")
    else:
        if options.precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)  # int8: the layers without Q/DQ run FP16
        if options.precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from Q/DQ
        if options.precision != "fp32" and options.fp32_layers != "none":
            fp32 = select_fp32_layers(_describe_network(trt, network), patterns=options.fp32_patterns,
                                      preset=options.fp32_layers)
            if fp32:
                _apply_fp32(trt, network, fp32)
                # OBEY: fail the build rather than silently run an island in FP16.
                config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    log.info("FP32 layers: %d (%s)", len(fp32), ", ".join(sorted(set(fp32.values()))) or "none")

    if options.dla_core is not None:
        available = int(builder.num_DLA_cores)
        if options.dla_core >= available:
            raise ValueError(f"DLA core {options.dla_core} requested, this device has {available} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        if options.gpu_fallback:
            # DLA has no FP32, no TopK over large K, ...: those run on the GPU.
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)

    cache_path = Path(options.timing_cache) if options.timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(timing_cache, False):  # from another device / version: start fresh
        log.warning("timing cache %s does not match this device / TensorRT: starting a new one", cache_path)
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
    data = bytes(memoryview(serialized))
    runtime = trt.Runtime(logger)
    if options.dla_core is not None:
        runtime.DLA_core = options.dla_core  # a DLA engine deserialises onto the runtime's DLA core
    engine = runtime.deserialize_cuda_engine(data)  # catch a broken engine now, not at run time
    if engine is None:
        raise RuntimeError(f"the engine built from {onnx_path} does not deserialize on this device")
    _atomic_write(out_path, data)
    if cache_path is not None:
        _atomic_write(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return out_path


def get_or_build_engine(
    onnx_path: str | Path,
    options: BuildOptions,
    engines_dir: str | Path,
    *,
    device: DeviceInfo | None = None,
) -> Path:
    """The cached engine for this ONNX, options and device, building (and recording) it if needed.

    Args:
        onnx_path: the ONNX model.
        options: :class:`BuildOptions` (precision, DLA core and :meth:`BuildOptions.key_fields`
            are part of the key).
        engines_dir: folder of ``<key>.engine`` + ``<key>.json``.
        device: override :func:`device_info` (tests, cross-checks).
    """
    device = device or device_info()
    key = device_engine_key(onnx_path, options, device)
    digest = key.digest()
    cached = find_cached_engine(engines_dir, digest)
    if cached is not None:
        return cached
    out = build_engine(onnx_path, options, Path(engines_dir) / engine_filename(digest))
    write_engine_record(out, key)
    return out
