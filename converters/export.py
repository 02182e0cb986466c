"""PyTorch detector -> static-shape ONNX graph (the portable truth every engine is built from).

One graph per input size: ``images`` float32 (B, 3, H, W) normalised with the detector's
:class:`~edge_ad.runtime.preprocess_spec.PreprocessSpec` -> ``anomaly_map`` float32 (B, 1, H, W)
and ``score`` float32 (B,). B, H and W are fixed at export (TensorRT and OpenVINO build their
fastest engines for static shapes; a different input size is a different export).

What :func:`export_onnx` guarantees about the file it writes:

* opset >= 17, TorchScript exporter (``dynamo=False``); where it fails or a future torch has
  removed it, the dynamo exporter at opset ``max(opset, 18)`` (no down-conversion for ``Pad``
  below 18), with a warning.
* ``onnx.checker.check_model`` passes (``check=True``).
* No ``If`` / ``Loop`` / ``Scan`` node anywhere (main graph, subgraphs, local functions):
  TensorRT rejects data-dependent control flow, and its presence means the module branched on
  tensor values, which the detector contract forbids. :class:`UnsupportedGraphError` names them.
* ``metadata_props`` (string key/values in the model) carry what a bundle writer needs without
  torch: ``edge_ad.method``, ``edge_ad.preprocess`` (JSON of the spec), ``edge_ad.backbone``, the
  input / output names and shapes, opset, exporter, edge_ad version and, when validated, the
  measured ONNX-vs-PyTorch error. :func:`read_onnx_metadata` decodes them.
* Models whose tensors exceed :data:`EXTERNAL_DATA_THRESHOLD_BYTES` (protobuf's 2 GiB limit with
  head-room) are written with their weights in ``<name>.onnx.data`` beside the graph.

Only :func:`export_onnx` and :func:`validate_onnx` import torch; the rest of this module (graph
checks, metadata reading) is torch-free.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import onnx
    import torch

__all__ = [
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "FORBIDDEN_OPS",
    "INPUT_NAME",
    "METADATA_PREFIX",
    "MIN_OPSET",
    "OUTPUT_NAMES",
    "ExportValidation",
    "OnnxValidationError",
    "UnsupportedGraphError",
    "check_onnx_graph",
    "export_onnx",
    "find_control_flow",
    "read_onnx_metadata",
    "validate_onnx",
]

INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
MIN_OPSET = 17
#: Op types that must not appear: TensorRT rejects them and they mean data-dependent control flow.
FORBIDDEN_OPS = ("If", "Loop", "Scan")
#: Above this many bytes of weights the model is saved with external data (protobuf limit: 2 GiB).
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
METADATA_PREFIX = "edge_ad."


class UnsupportedGraphError(ValueError):
    """The exported graph contains something the edge engines cannot run (the message says what)."""


class OnnxValidationError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class ExportValidation:
    """ONNX (onnxruntime, CPU) vs PyTorch on the same normalised images.

    Attributes:
        num_images: images compared.
        max_abs_map_error: max |onnx - torch| over all anomaly-map pixels (map units: normalised
            good-image standard deviations).
        max_abs_score_error: max |onnx - torch| over the image scores (same units).
        atol, rtol: the tolerance: an element fails when ``|onnx - torch| > atol + rtol * |torch|``.
        passed: no element failed.
    """

    num_images: int
    max_abs_map_error: float
    max_abs_score_error: float
    atol: float
    rtol: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# Graph checks (torch-free)
# ------------------------------------------------------------------------------------------------


def _iter_graphs(graph: "onnx.GraphProto", where: str) -> Iterator[tuple["onnx.GraphProto", str]]:
    """``graph`` and every subgraph held in node attributes (If branches, Loop bodies), recursively."""
    import onnx

    yield graph, where
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graphs(attr.g, f"{where}/{node.name or node.op_type}.{attr.name}")
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for i, sub in enumerate(attr.graphs):
                    yield from _iter_graphs(sub, f"{where}/{node.name or node.op_type}.{attr.name}[{i}]")


def find_control_flow(model: "onnx.ModelProto | str | os.PathLike[str]") -> list[str]:
    """Control-flow nodes (``If``, ``Loop``, ``Scan``) anywhere in ``model``.

    Searches the main graph, nested subgraphs and the model's local functions (the dynamo exporter
    emits functions).

    Returns:
        ``"<op_type> '<node name>' in <location>"`` per node found; empty when the graph is clean.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    found = []
    for graph, where in _iter_graphs(model.graph, "graph"):
        found += [f"{n.op_type} {n.name!r} in {where}" for n in graph.node if n.op_type in FORBIDDEN_OPS]
    for fn in model.functions:
        found += [f"{n.op_type} {n.name!r} in function {fn.name}" for n in fn.node if n.op_type in FORBIDDEN_OPS]
    return found


def _static_dims(value_info: "onnx.ValueInfoProto") -> tuple[int, ...] | None:
    """The dims of a tensor value_info if every one is a fixed positive integer, else None."""
    dims = value_info.type.tensor_type.shape.dim
    if not dims and not value_info.type.tensor_type.HasField("shape"):
        return None
    out = []
    for d in dims:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        out.append(int(d.dim_value))
    return tuple(out)


def check_onnx_graph(
    model: "onnx.ModelProto | str | os.PathLike[str]",
    *,
    input_shape: tuple[int, int, int, int] | None = None,
) -> None:
    """Raise :class:`UnsupportedGraphError` unless ``model`` is an edge-deployable detector graph.

    Checks: no ``If`` / ``Loop`` / ``Scan`` node; exactly one input named ``images`` with a static
    4-D shape (``input_shape`` when given); outputs named ``anomaly_map`` and ``score`` in that
    order; opset >= :data:`MIN_OPSET`.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    flow = find_control_flow(model)
    if flow:
        shown = "; ".join(flow[:5]) + (f"; and {len(flow) - 5} more" if len(flow) > 5 else "")
        raise UnsupportedGraphError(
            f"the ONNX graph contains {len(flow)} control-flow node(s) ({shown}). TensorRT rejects If/Loop/Scan "
            "and they mean the module branches on tensor values. Fix the module: no Python `if`/`for` on tensor "
            "values, no torch.jit.script'ed parts; branch on shapes only (fixed at export) and compute both "
            "sides with torch.where where a value must choose"
        )
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise UnsupportedGraphError(
            f"the graph must have exactly one input named {INPUT_NAME!r}, found {[i.name for i in inputs]}"
        )
    dims = _static_dims(inputs[0])
    if dims is None or len(dims) != 4 or dims[1] != 3:
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                 for d in inputs[0].type.tensor_type.shape.dim]
        raise UnsupportedGraphError(
            f"input {INPUT_NAME!r} must have a static (B, 3, H, W) shape, found {shape}: export one graph per "
            "input size without dynamic axes"
        )
    if input_shape is not None and dims != tuple(input_shape):
        raise UnsupportedGraphError(f"input {INPUT_NAME!r} is {dims}, expected {tuple(input_shape)}")
    outputs = [o.name for o in model.graph.output]
    if tuple(outputs) != OUTPUT_NAMES:
        raise UnsupportedGraphError(f"outputs must be {list(OUTPUT_NAMES)} in that order, found {outputs}")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < MIN_OPSET:
        raise UnsupportedGraphError(f"opset {opset} < {MIN_OPSET}: re-export with opset >= {MIN_OPSET}")


# ------------------------------------------------------------------------------------------------
# Metadata (torch-free)
# ------------------------------------------------------------------------------------------------

_JSON_KEYS = ("preprocess", "input_shape", "outputs", "validation", "score_normalization")


def read_onnx_metadata(model: "onnx.ModelProto | str | os.PathLike[str]") -> dict[str, Any]:
    """The ``edge_ad.*`` metadata props of an exported model, prefix stripped, JSON values decoded.

    Returns e.g. ``{"method": "foundad", "preprocess": {"height": 512, ...}, "backbone":
    "dinov3_vitb16", "input_name": "images", "input_shape": [1, 3, 512, 512], "outputs": [...],
    "opset": "17", "exporter": "torchscript", "edge_ad_version": "0.1.0", "validation": {...}}``.
    Keys the writer added through ``metadata=`` come back as written (strings, JSON-decoded when
    they parse as JSON objects / lists).
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if not prop.key.startswith(METADATA_PREFIX):
            continue
        key = prop.key[len(METADATA_PREFIX):]
        value: Any = prop.value
        if key in _JSON_KEYS or value[:1] in ("{", "["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        out[key] = value
    return out


def _set_metadata(model: "onnx.ModelProto", props: Mapping[str, Any]) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        full = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if full in existing:
            existing[full].value = text
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = full, text


# ------------------------------------------------------------------------------------------------
# Export (torch)
# ------------------------------------------------------------------------------------------------


def _tensor_bytes(module: "torch.nn.Module") -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _torch_export(module: "torch.nn.Module", example: "torch.Tensor", path: Path, opset: int) -> tuple[str, int]:
    """Export to ``path``; returns (exporter name, opset used).

    The TorchScript exporter (``dynamo=False``) first: it exports opset 17 as asked. Its warnings
    are silenced: the tracer warns for every static shape check (harmless here; validation catches
    a frozen branch) and about its own deprecation. Where it fails or is gone (a future torch), the
    dynamo exporter at ``max(opset, 18)`` (it has no down-conversion for ``Pad`` below 18), with a
    warning naming the first exporter's error.
    """
    import torch

    names = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=True, **names)
        return "torchscript", opset
    except Exception as exc:  # removed in this torch, or an op it cannot export
        legacy_error = exc
    dynamo_opset = max(opset, 18)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=dynamo_opset, verbose=False,
                                        **names)
            program.save(str(path), external_data=_tensor_bytes(module) > EXTERNAL_DATA_THRESHOLD_BYTES)
    except Exception as exc:
        raise RuntimeError(
            f"ONNX export failed with both exporters: TorchScript ({type(legacy_error).__name__}: {legacy_error}) "
            f"and dynamo at opset {dynamo_opset} ({type(exc).__name__}: {exc})"
        ) from exc
    warnings.warn(
        f"the TorchScript ONNX exporter failed ({type(legacy_error).__name__}: {legacy_error}); exported with the "
        f"dynamo exporter at opset {dynamo_opset} instead",
        UserWarning,
        stacklevel=3,
    )
    return "dynamo", dynamo_opset


def export_onnx(
    detector: "torch.nn.Module",
    path: str | os.PathLike[str],
    *,
    batch_size: int = 1,
    opset: int = MIN_OPSET,
    check: bool = True,
    validate_images: np.ndarray | None = None,
    atol: float = 1e-2,
    rtol: float = 1e-3,
    external_data: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Export a detector to one static-shape ONNX file.

    Args:
        detector: an :class:`~edge_ad.methods.base.AnomalyDetector` (or any module with
            ``forward(images (B, 3, H, W)) -> (anomaly_map (B, 1, H, W), score (B,))`` and an
            ``example_input(batch_size)``); exported in eval mode on its current device.
        path: the ``.onnx`` file to write (parent folders are created; an existing file is
            replaced only once the new one passed every check).
        batch_size: B, fixed in the graph. A runner with a static batch splits / pads larger
            batches (:func:`edge_ad.converters.fidelity.onnxruntime_runner` does).
        opset: ONNX opset, >= 17.
        check: run ``onnx.checker.check_model`` and :func:`check_onnx_graph` (control flow, names,
            static shapes). Leave on; off only to inspect a broken export.
        validate_images: optional float32 (N, 3, H, W) normalised images (e.g. a few real
            images through ``preprocess_batch``): run the graph with onnxruntime on CPU and compare
            with the PyTorch module; :class:`OnnxValidationError` when an element differs by more
            than ``atol + rtol * |torch|``. The measured errors go into the ``edge_ad.validation``
            metadata prop either way. Use real images, not the zero export input: a branch frozen
            at trace time only shows on other data. The reference runs on the module's device;
            export a CPU module for the tightest check (CUDA convolutions default to TF32).
        atol, rtol: validation tolerance (map units: normalised good-image standard deviations).
            The default 1e-2 (1 % of a good-image spread) is far below any decision threshold
            (~3) yet above float32 reassociation noise: a knn run's distance MatMul
            (|a|^2 + |b|^2 - 2ab over a large bank) differs between torch and onnxruntime by up to
            ~4e-3 at 320 px. Export bugs (frozen control flow, a wrong resize) give errors of order 1.
        external_data: store weights in ``<path>.data`` beside the graph; None = only when the
            weights exceed :data:`EXTERNAL_DATA_THRESHOLD_BYTES` (protobuf cannot hold 2 GiB).
        metadata: extra metadata props (``key -> str`` or JSON-serialisable value), stored under
            ``edge_ad.<key>``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: bad ``batch_size`` / ``opset`` / ``validate_images`` shape.
        UnsupportedGraphError: control flow, dynamic shapes or wrong names in the graph.
        onnx.checker.ValidationError: the checker rejected the model.
        OnnxValidationError: onnxruntime disagrees with PyTorch beyond the tolerance.
    """
    import onnx
    import torch

    path = Path(path)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if int(opset) < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (LayerNormalization, TensorRT 10 parsers), got {opset}")
    if not callable(getattr(detector, "example_input", None)):
        raise TypeError(
            f"export_onnx needs an edge_ad detector (with example_input()), got {type(detector).__name__}"
        )
    detector = detector.eval()
    example = detector.example_input(int(batch_size))
    input_shape = tuple(int(d) for d in example.shape)
    if validate_images is not None:
        validate_images = np.asarray(validate_images)
        if validate_images.ndim != 4 or tuple(validate_images.shape[1:]) != input_shape[1:]:
            raise ValueError(
                f"validate_images must be (N, {', '.join(map(str, input_shape[1:]))}) normalised float images "
                f"(preprocess_batch with the detector's preprocess_spec), got shape {validate_images.shape}"
            )
    if external_data is None:
        external_data = _tensor_bytes(detector) > EXTERNAL_DATA_THRESHOLD_BYTES

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".onnx-export-", dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad():
            exporter, used_opset = _torch_export(detector, example, raw, int(opset))
        model = onnx.load(str(raw), load_external_data=True)
        if check:
            check_onnx_graph(model, input_shape=input_shape)
        validation = None
        if validate_images is not None:
            validation = validate_onnx(raw, detector, validate_images, atol=atol, rtol=rtol, raise_on_failure=False)

        props: dict[str, Any] = _detector_metadata(detector)
        props.update(
            input_name=INPUT_NAME,
            input_shape=list(input_shape),
            outputs=[{"name": OUTPUT_NAMES[0], "shape": [input_shape[0], 1, *input_shape[2:]]},
                     {"name": OUTPUT_NAMES[1], "shape": [input_shape[0]]}],
            opset=str(used_opset),
            exporter=exporter,
        )
        if validation is not None:
            props["validation"] = validation.to_dict()
        props.update(metadata or {})
        _set_metadata(model, props)
        model.producer_name = "edge_ad"

        staged = Path(tmp) / path.name
        if external_data:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        del model
        if check:
            onnx.checker.check_model(str(staged))  # by path: works above 2 GiB with external data
        if validation is not None and not validation.passed:
            raise OnnxValidationError(
                f"onnxruntime differs from PyTorch on {validation.num_images} validation image(s): max |map error| "
                f"{validation.max_abs_map_error:.3g}, max |score error| {validation.max_abs_score_error:.3g} "
                f"(allowed {atol:g} + {rtol:g}*|torch|). Usual causes: Python control flow on tensor values frozen "
                "at trace time, or an op the exporter decomposes differently; compare the graph with the module. "
                f"Nothing was written to {path}"
            )
        sidecar = path.with_name(path.name + ".data")
        if external_data:
            os.replace(Path(tmp) / sidecar.name, sidecar)
        elif sidecar.is_file():
            sidecar.unlink()  # the weights of an earlier external-data export of this file: stale now
        os.replace(staged, path)
    return path


def _detector_metadata(detector: Any) -> dict[str, Any]:
    """What a bundle writer reads from the ONNX file: method, preprocessing, backbone, normaliser."""
    from edge_ad._version import __version__

    props: dict[str, Any] = {"edge_ad_version": __version__}
    method = getattr(detector, "method", "")
    if method:
        props["method"] = str(method)
    spec = getattr(detector, "preprocess_spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        props["preprocess"] = spec.to_dict()
    backbone = getattr(getattr(detector, "backbone", None), "info", None)
    if backbone is not None:
        props["backbone"] = str(backbone.name)
    normalizer = getattr(detector, "normalizer", None)
    if normalizer is not None and hasattr(normalizer, "stats"):
        try:
            props["score_normalization"] = {k: float(v) if isinstance(v, (int, float)) else v
                                            for k, v in normalizer.stats().items()}
        except (TypeError, ValueError):  # pragma: no cover - a normaliser with exotic stats
            pass
    return props


def validate_onnx(
    onnx_path: str | os.PathLike[str],
    detector: "torch.nn.Module",
    images: np.ndarray,
    *,
    atol: float = 1e-2,
    rtol: float = 1e-3,
    raise_on_failure: bool = True,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
) -> ExportValidation:
    """Compare an exported graph (onnxruntime) with its PyTorch detector on normalised images.

    Args:
        onnx_path: the exported file.
        detector: the module it was exported from.
        images: float32 (N, 3, H, W) normalised images; N need not match the graph's batch.
        atol, rtol: an element fails when ``|onnx - torch| > atol + rtol * |torch|``.
        raise_on_failure: raise :class:`OnnxValidationError` when any element fails.
        providers: onnxruntime execution providers.

    Returns:
        :class:`ExportValidation` with the max map / score errors.
    """
    import torch

    from .fidelity import onnxruntime_runner

    images = np.ascontiguousarray(images, dtype=np.float32)
    runner = onnxruntime_runner(onnx_path, providers=providers)
    maps, scores = runner(images)
    detector = detector.eval()
    device = next((t.device for t in detector.parameters()), torch.device("cpu"))
    ref_maps, ref_scores = [], []
    with torch.no_grad():
        for start in range(0, len(images), 8):
            out = detector(torch.from_numpy(images[start:start + 8]).to(device))
            ref_maps.append(out[0].float().cpu().numpy())
            ref_scores.append(out[1].float().cpu().numpy())
    ref_map, ref_score = np.concatenate(ref_maps), np.concatenate(ref_scores)
    map_err = np.abs(maps.astype(np.float64) - ref_map)
    score_err = np.abs(scores.astype(np.float64) - ref_score)
    passed = bool((map_err <= atol + rtol * np.abs(ref_map)).all() and (score_err <= atol + rtol * np.abs(ref_score)).all())
    result = ExportValidation(
        num_images=int(len(images)),
        max_abs_map_error=float(map_err.max()),
        max_abs_score_error=float(score_err.max()),
        atol=float(atol),
        rtol=float(rtol),
        passed=passed,
    )
    if raise_on_failure and not passed:
        raise OnnxValidationError(
            f"{onnx_path}: onnxruntime differs from PyTorch: max |map error| {result.max_abs_map_error:.3g}, "
            f"max |score error| {result.max_abs_score_error:.3g} (allowed {atol:g} + {rtol:g}*|torch|)"
        )
    return result
