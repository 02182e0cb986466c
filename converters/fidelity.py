"""Fidelity of a converted model: how far its outputs are from the PyTorch FP32 detector.

A *runner* is any callable ``runner(images) -> (maps, scores)`` with

* ``images``: float32 (B, 3, H, W), normalised with the detector's ``PreprocessSpec``;
* ``maps``: float (B, 1, H, W) anomaly maps; ``scores``: float (B,) image scores,

so onnxruntime sessions (:func:`onnxruntime_runner`), OpenVINO compiled models, TensorRT engines
and the PyTorch module itself (:func:`torch_runner`) all plug in. A runner may carry ``format``
and ``precision`` attributes (strings) that the report records.

:func:`fidelity_report` runs the reference and the candidate on the same validation images, which
go through :func:`edge_ad.runtime.preprocessing.preprocess_batch` with the detector's spec exactly
as in evaluation, and reports map / score errors and the AUROC of both (when the set has labels /
masks). The result serialises to ``fidelity.json`` in a bundle.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edge_ad.runtime.preprocess_spec import PreprocessSpec
from edge_ad.runtime.preprocessing import preprocess_batch

__all__ = [
    "FIDELITY_FILE",
    "METRICS",
    "FidelityReport",
    "OnnxRuntimeRunner",
    "Runner",
    "fidelity_report",
    "onnxruntime_runner",
    "torch_runner",
]

FIDELITY_FILE = "fidelity.json"
#: Detection metrics the report can compare (names of :mod:`edge_ad.metrics` functions).
METRICS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")


@runtime_checkable
class Runner(Protocol):
    """``runner(images float32 (B, 3, H, W)) -> (maps (B, 1, H, W), scores (B,))`` as numpy arrays."""

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


# ------------------------------------------------------------------------------------------------
# Runners
# ------------------------------------------------------------------------------------------------


def _precision_of_onnx(model_path: Path, input_type: str) -> str:
    """``"fp32"`` / ``"fp16"`` from the input type, ``"int8-qdq"`` when the graph quantises."""
    try:
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
            return "int8-qdq"
    except Exception:  # pragma: no cover - onnx missing or unreadable: fall back to the input type
        pass
    return "fp16" if "float16" in input_type else "fp32"


class OnnxRuntimeRunner:
    """An onnxruntime session as a :class:`Runner`.

    Handles a static batch dimension: inputs are fed in chunks of the graph's batch size, the last
    chunk padded by repeating its final image (the padding outputs are dropped). Inputs are cast to
    the graph's input type (float16 graphs get float16); outputs come back as float32.

    Attributes:
        path: the model file.
        session: the ``onnxruntime.InferenceSession``.
        batch_size: the graph's fixed batch size, or None when the batch axis is dynamic.
        format: ``"onnxruntime"``; precision: ``"fp32"``, ``"fp16"`` or ``"int8-qdq"``.
    """

    format = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        providers: Sequence[str] = ("CPUExecutionProvider",),
        *,
        session_options: Any = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        available = set(ort.get_available_providers())
        missing = [p for p in providers if (p[0] if isinstance(p, tuple) else p) not in available]
        if missing:
            raise ValueError(
                f"onnxruntime providers {missing} are not available in this build (available: {sorted(available)}); "
                "install the matching onnxruntime package (e.g. onnxruntime-gpu) or pass providers=('CPUExecutionProvider',)"
            )
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options, providers=list(providers))
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ValueError(f"{self.path}: expected one input (images), found {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        self._input_dtype = np.float16 if "float16" in inputs[0].type else np.float32
        batch = inputs[0].shape[0] if inputs[0].shape else None
        self.batch_size: int | None = int(batch) if isinstance(batch, int) and batch > 0 else None
        names = [o.name for o in self.session.get_outputs()]
        if len(names) < 2:
            raise ValueError(f"{self.path}: expected outputs (anomaly_map, score), found {names}")
        self.output_names = ["anomaly_map", "score"] if {"anomaly_map", "score"} <= set(names) else names[:2]
        self.precision = _precision_of_onnx(self.path, inputs[0].type)

    def _run(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = self.session.run(self.output_names, {self.input_name: chunk.astype(self._input_dtype, copy=False)})
        return np.asarray(maps, np.float32), np.asarray(scores, np.float32).reshape(len(chunk))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got shape {images.shape}")
        step = self.batch_size or len(images)
        maps, scores = [], []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            n = len(chunk)
            if self.batch_size is not None and n < self.batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
            m, s = self._run(chunk)
            maps.append(m[:n])
            scores.append(s[:n])
        return np.concatenate(maps), np.concatenate(scores)

    def __repr__(self) -> str:
        return f"OnnxRuntimeRunner({str(self.path)!r}, providers={self.session.get_providers()}, batch={self.batch_size})"


def onnxruntime_runner(
    onnx_path: str | os.PathLike[str],
    providers: Sequence[str] = ("CPUExecutionProvider",),
    *,
    session_options: Any = None,
) -> OnnxRuntimeRunner:
    """A :class:`Runner` over an onnxruntime session of ``onnx_path`` (see :class:`OnnxRuntimeRunner`)."""
    return OnnxRuntimeRunner(onnx_path, providers, session_options=session_options)


class _TorchRunner:
    format = "pytorch"

    def __init__(self, module: Any, device: Any = None, batch_size: int = 8) -> None:
        import torch

        self.module = module.eval()
        if device is None:
            device = next((t.device for t in module.parameters()), torch.device("cpu"))
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        dtype = next((t.dtype for t in module.parameters()), torch.float32)
        self.precision = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        maps, scores = [], []
        dtype = next((t.dtype for t in self.module.parameters()), torch.float32)
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + self.batch_size], np.float32))
                out = self.module(x.to(self.device, dtype))
                maps.append(out[0].float().cpu().numpy())
                scores.append(out[1].float().cpu().numpy().reshape(-1))
        return np.concatenate(maps), np.concatenate(scores)

    def __repr__(self) -> str:
        return f"torch_runner({type(self.module).__name__}, device={self.device})"


def torch_runner(module: Any, *, device: Any = None, batch_size: int = 8) -> Runner:
    """A :class:`Runner` over a PyTorch detector (no grad, eval mode, on ``device`` or the module's)."""
    return _TorchRunner(module, device, batch_size)


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------


@dataclass
class FidelityReport:
    """Converted model vs reference (PyTorch FP32) on one validation set.

    Map errors are in map units (normalised good-image standard deviations, the detector's output
    units); AUROC values are fractions in 0..1; ``delta = candidate - reference``.

    Attributes:
        reference: name of the reference (e.g. ``"pytorch-fp32"``).
        format: the candidate's format (``"onnxruntime"``, ``"openvino"``, ``"tensorrt"``, ...).
        precision: the candidate's precision (``"fp32"``, ``"fp16"``, ``"int8"``, ...).
        num_images: validation images; num_anomalous: of those labelled anomalous (None: no labels).
        input_size: (H, W) model input in pixels.
        map: ``max_abs_error``, ``mean_abs_error``, ``p99_abs_error``, ``pearson_r`` (over all
            pixels of all images), ``cosine_mean`` / ``cosine_min`` (per image, flattened maps),
            ``reference_min`` / ``reference_max``.
        score: ``max_abs_error``, ``mean_abs_error``, ``pearson_r``, ``spearman_r``.
        metrics: ``{name: {"reference", "candidate", "delta"}}`` for the metrics the set supports.
        decisions: with thresholds: ``image_agreement`` (fraction of images with the same
            good / anomalous decision) and ``pixel_agreement`` (fraction of pixels); with labels
            (and masks) also ``candidate_image_fpr`` / ``candidate_image_recall`` (and
            ``candidate_pixel_fpr`` / ``candidate_pixel_recall``): what the converted model achieves
            at those thresholds.
        worst_images: up to 5 ``{"file", "max_abs_map_error", "score_abs_error"}``, worst first.
        validation_set: ``{"files", "num_images", "hash", "description"}``; ``hash`` is sha256
            over the preprocessed input tensors (identical inputs <=> identical hash).
        preprocess: the :class:`PreprocessSpec` used, as a dict.
        extra: free-form notes from the caller (calibration hash, target, ...).
    """

    reference: str
    format: str
    precision: str
    num_images: int
    num_anomalous: int | None
    input_size: tuple[int, int]
    map: dict[str, float]
    score: dict[str, float]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    decisions: dict[str, float] = field(default_factory=dict)
    worst_images: list[dict[str, Any]] = field(default_factory=list)
    validation_set: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of plain Python types (no numpy)."""
        from edge_ad._version import __version__

        d = _plain(asdict(self))
        d["schema"] = "edge_ad.fidelity/1"
        d["edge_ad_version"] = __version__
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FidelityReport":
        """Inverse of :meth:`to_dict`."""
        d = {k: v for k, v in d.items() if k not in ("schema", "edge_ad_version")}
        d["input_size"] = tuple(d["input_size"])
        return cls(**d)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write JSON to ``path``; a folder gets ``fidelity.json`` inside it. Returns the file."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / FIDELITY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "FidelityReport":
        path = Path(path)
        if path.is_dir():
            path = path / FIDELITY_FILE
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))

    def failures(self, *, max_map_error: float | None = None, max_metric_drop: float | None = None,
                 min_map_pearson: float | None = None) -> list[str]:
        """Human-readable reasons this conversion misses the given budgets (empty = within all).

        Args:
            max_map_error: allowed ``map.max_abs_error`` (map units).
            max_metric_drop: allowed drop of any compared metric (reference - candidate, 0..1).
            min_map_pearson: required ``map.pearson_r``.
        """
        out = []
        if max_map_error is not None and self.map["max_abs_error"] > max_map_error:
            out.append(f"max |map error| {self.map['max_abs_error']:.4g} > {max_map_error:g}")
        if min_map_pearson is not None and not self.map["pearson_r"] >= min_map_pearson:
            out.append(f"map Pearson r {self.map['pearson_r']:.4f} < {min_map_pearson:g}")
        if max_metric_drop is not None:
            for name, m in self.metrics.items():
                if -m["delta"] > max_metric_drop:
                    out.append(f"{name} dropped by {-m['delta']:.4f} ({m['reference']:.4f} -> {m['candidate']:.4f}) "
                               f"> {max_metric_drop:g}")
        return out

    def table(self) -> str:
        """A fixed-width text table for terminals and logs."""
        title = f"fidelity: {self.format} {self.precision} vs {self.reference}"
        sub = (f"{self.num_images} images at {self.input_size[0]}x{self.input_size[1]}"
               + (f" ({self.num_anomalous} anomalous)" if self.num_anomalous is not None else "")
               + (f", set {str(self.validation_set.get('hash', ''))[:12]}" if self.validation_set.get("hash") else ""))
        rows: list[tuple[str, str, str, str]] = [("quantity", "reference", "candidate", "delta / value")]
        for key in ("max_abs_error", "mean_abs_error", "p99_abs_error", "pearson_r", "cosine_mean", "cosine_min"):
            if key in self.map:
                rows.append((f"map {key}", "", "", _fmt(self.map[key])))
        for key in ("max_abs_error", "mean_abs_error", "pearson_r", "spearman_r"):
            if key in self.score:
                rows.append((f"score {key}", "", "", _fmt(self.score[key])))
        for name, m in self.metrics.items():
            delta = m["delta"]
            rows.append((name, _fmt(m["reference"]), _fmt(m["candidate"]),
                         f"{delta:+.4f}" if delta == 0 or abs(delta) >= 5e-5 else f"{delta:+.1e}"))
        for key, value in self.decisions.items():
            rows.append((f"decision {key}", "", "", _fmt(value)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [title, sub]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.worst_images:
            worst = self.worst_images[0]
            lines.append(f"worst image: {worst['file']} (max |map error| {_fmt(worst['max_abs_map_error'])})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------------------
# Validation-set iteration
# ------------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    images: np.ndarray          # float32 (B, 3, H, W)
    files: list[str]
    labels: list[int] | None
    masks: list[np.ndarray] | None  # bool (H, W) at input size


def _iter_batches(data: Any, spec: PreprocessSpec, batch_size: int, color_order: str) -> Iterator[_Batch]:
    """Batches of a dataset (items with ``image``/``mask``/``label``/``path``), a sequence of uint8
    frames, or a float (N, 3, H, W) array that is already preprocessed."""
    if isinstance(data, np.ndarray) and data.dtype.kind == "f":
        if data.ndim != 4 or tuple(data.shape[1:]) != (3, *spec.size):
            raise ValueError(
                f"preprocessed images must be float (N, 3, {spec.height}, {spec.width}), got {data.shape}"
            )
        for start in range(0, len(data), batch_size):
            chunk = np.ascontiguousarray(data[start:start + batch_size], np.float32)
            yield _Batch(chunk, [f"array[{start + i}]" for i in range(len(chunk))], None, None)
        return
    from edge_ad.data.masks import resize_mask

    n = len(data)
    for start in range(0, n, batch_size):
        items = [data[i] for i in range(start, min(n, start + batch_size))]
        if all(hasattr(s, "image") for s in items):
            frames = [s.image for s in items]
            files = [str(getattr(s, "path", f"item[{start + i}]")) for i, s in enumerate(items)]
            labels = [int(s.label) for s in items] if all(hasattr(s, "label") for s in items) else None
            masks = None
            if all(getattr(s, "mask", None) is not None for s in items):
                masks = [resize_mask(np.asarray(s.mask, bool), spec.size) for s in items]
            images = preprocess_batch(frames, spec, color_order="rgb")
        else:
            frames = [np.asarray(s) for s in items]
            files = [f"frame[{start + i}]" for i in range(len(items))]
            labels, masks = None, None
            images = preprocess_batch(frames, spec, color_order=color_order)
        yield _Batch(images, files, labels, masks)


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    if den == 0.0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(a @ b) / den


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):  # average ranks of ties
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j)
        i = j + 1
    return ranks


def _resolve_runner(runner: Any, name: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    if isinstance(runner, (str, os.PathLike)):
        return onnxruntime_runner(runner)
    try:
        import torch

        if isinstance(runner, torch.nn.Module):
            return torch_runner(runner)
    except ImportError:  # pragma: no cover - torch-free install: runners only
        pass
    if not callable(runner):
        raise TypeError(
            f"{name} must be a runner (callable images (B,3,H,W) -> (maps, scores)), a torch detector or an "
            f".onnx path, got {type(runner).__name__}"
        )
    return runner


def _is_precomputed(reference: Any) -> bool:
    """Predictions computed earlier (``maps`` (N, H, W) and ``scores`` (N,), e.g.
    :class:`edge_ad.evaluation.predict.Predictions`) rather than a model to run."""
    return not callable(reference) and hasattr(reference, "maps") and hasattr(reference, "scores")


def _check_outputs(maps: Any, scores: Any, n: int, size: tuple[int, int], who: str) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, np.float32)
    scores = np.asarray(scores, np.float32).reshape(-1)
    if maps.ndim == 3:
        maps = maps[:, None]
    if maps.shape != (n, 1, *size) or scores.shape != (n,):
        raise ValueError(
            f"{who} returned maps {maps.shape} and scores {scores.shape} for {n} images; a runner must return "
            f"maps (B, 1, {size[0]}, {size[1]}) and scores (B,) at the model input size"
        )
    if not (np.isfinite(maps).all() and np.isfinite(scores).all()):
        raise ValueError(f"{who} returned non-finite maps or scores (NaN / inf): the conversion is broken "
                         "(e.g. fp16 overflow); fix it before measuring fidelity")
    return maps, scores


def fidelity_report(
    reference: Any,
    candidate: Any,
    data: Any,
    *,
    spec: PreprocessSpec | None = None,
    batch_size: int = 8,
    color_order: str = "rgb",
    format: str | None = None,
    precision: str | None = None,
    reference_name: str = "pytorch-fp32",
    metrics: Sequence[str] = ("image_auroc", "pixel_auroc"),
    thresholds: Any = None,
    description: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> FidelityReport:
    """Compare a converted model with the reference on a validation set.

    Args:
        reference: the PyTorch FP32 detector (an ``nn.Module``; wrapped with :func:`torch_runner`),
            any runner, or predictions computed once on the same set in the same order (an object
            with ``maps`` (N, H, W) and ``scores`` (N,), e.g. ``predict_dataset``'s result, whose
            ``paths`` are checked against the set): compare several conversions without
            re-running FP32 each time (pass ``spec`` then).
        candidate: the converted model's runner (``images float32 (B, 3, H, W) -> (maps (B, 1, H,
            W), scores (B,))``), or an ``.onnx`` path (run with :func:`onnxruntime_runner`).
        data: the validation set: a dataset of samples (``image`` uint8 RGB, ``mask``, ``label``,
            ``path``; e.g. ``MVTecDataset(root, cat, "test")``), a sequence of uint8 frames
            (``color_order``), or a float32 (N, 3, H, W) array already preprocessed with ``spec``.
            Use images neither model was calibrated on.
        spec: preprocessing; default ``reference.preprocess_spec`` (required for other references).
        batch_size: images per call of each runner.
        color_order: channel order of raw frames (datasets always give RGB).
        format, precision: names recorded in the report; default the candidate's ``format`` /
            ``precision`` attributes, else ``"unknown"``.
        reference_name: the reference's name in the report.
        metrics: detection metrics to compare, from :data:`METRICS`; image metrics need both
            labels, pixel metrics masks with defect pixels; unsupported ones are skipped.
        thresholds: optional :class:`edge_ad.calibration.Thresholds` (fitted on the reference):
            adds decision agreement between the two models.
        description: a free-text name of the validation set (e.g. ``"mvtec hazelnut test"``).
        extra: free-form entries stored in ``report.extra``.

    Returns:
        :class:`FidelityReport`.
    """
    from edge_ad import metrics as metric_fns

    if spec is None:
        spec = getattr(reference, "preprocess_spec", None)
        if spec is None:
            raise ValueError("spec is required when the reference is not a detector with a preprocess_spec")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    precomputed = _is_precomputed(reference)
    ref_run = None if precomputed else _resolve_runner(reference, "reference")
    cand_run = _resolve_runner(candidate, "candidate")
    size = spec.size

    ref_maps, cand_maps, ref_scores, cand_scores = [], [], [], []
    files: list[str] = []
    labels: list[int] | None = []
    masks: list[np.ndarray] | None = []
    digest = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for batch in _iter_batches(data, spec, int(batch_size), color_order):
        n = len(batch.images)
        digest.update(batch.images.tobytes())
        if precomputed:
            done = len(files)
            ref_out = (np.asarray(reference.maps[done:done + n]), np.asarray(reference.scores[done:done + n]))
            if len(ref_out[1]) != n:
                raise ValueError(f"the precomputed reference holds {len(reference.scores)} predictions but the "
                                 "validation set has more images: predict the same set")
            ref_paths = getattr(reference, "paths", None)
            if ref_paths is not None and batch.labels is not None:
                mismatch = [(a, str(b)) for a, b in zip(batch.files, ref_paths[done:done + n]) if a != str(b)]
                if mismatch:
                    raise ValueError(f"precomputed reference and validation set disagree: {mismatch[0][1]} vs "
                                     f"{mismatch[0][0]}; predict the same set in the same order")
        else:
            ref_out = ref_run(batch.images)  # type: ignore[misc]
        rm, rs = _check_outputs(*ref_out, n, size, "the reference")
        cm, cs = _check_outputs(*cand_run(batch.images), n, size, "the candidate")
        ref_maps.append(rm[:, 0])
        cand_maps.append(cm[:, 0])
        ref_scores.append(rs)
        cand_scores.append(cs)
        files += batch.files
        labels = labels + batch.labels if labels is not None and batch.labels is not None else None
        masks = masks + batch.masks if masks is not None and batch.masks is not None else None
    if not files:
        raise ValueError("the validation set is empty")
    if precomputed and len(reference.scores) != len(files):
        raise ValueError(f"the precomputed reference holds {len(reference.scores)} predictions for {len(files)} "
                         "validation images: predict the same set")
    R, C = np.concatenate(ref_maps), np.concatenate(cand_maps)
    r, c = np.concatenate(ref_scores), np.concatenate(cand_scores)
    n = len(files)

    err = np.abs(C.astype(np.float64) - R)
    flat_r, flat_c = R.reshape(n, -1).astype(np.float64), C.reshape(n, -1).astype(np.float64)
    norm_r, norm_c = np.linalg.norm(flat_r, axis=1), np.linalg.norm(flat_c, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (flat_r * flat_c).sum(axis=1) / (norm_r * norm_c)
    cos[~np.isfinite(cos)] = 0.0  # one map all zeros, the other not: no agreement in direction
    cos[(norm_r == 0) & (norm_c == 0)] = 1.0  # both all zeros: identical
    map_stats = {
        "max_abs_error": float(err.max()),
        "mean_abs_error": float(err.mean()),
        "p99_abs_error": float(np.quantile(err, 0.99)),
        "pearson_r": _pearson(R, C),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "reference_min": float(R.min()),
        "reference_max": float(R.max()),
    }
    score_err = np.abs(c.astype(np.float64) - r)
    score_stats = {
        "max_abs_error": float(score_err.max()),
        "mean_abs_error": float(score_err.mean()),
        "pearson_r": _pearson(r, c) if n > 1 else 1.0,
        "spearman_r": _pearson(_ranks(r), _ranks(c)) if n > 1 else 1.0,
    }

    per_image = err.reshape(n, -1).max(axis=1)
    worst = np.argsort(-per_image, kind="stable")[:5]
    worst_images = [{"file": files[i], "max_abs_map_error": float(per_image[i]), "score_abs_error": float(score_err[i])}
                    for i in worst]

    y = np.asarray(labels, np.int64) if labels else None
    has_both = y is not None and 0 < int(y.sum()) < len(y)
    M = np.stack(masks) if masks else None
    has_pixels = M is not None and M.any() and not M.all()
    compared: dict[str, dict[str, float]] = {}
    for name in metrics:
        fn = getattr(metric_fns, name)
        if name.startswith("image_"):
            if not has_both:
                continue
            a, b = fn(y, r), fn(y, c)
        else:
            if not has_pixels:
                continue
            a, b = fn(M, R), fn(M, C)
        compared[name] = {"reference": float(a), "candidate": float(b), "delta": float(b) - float(a)}

    decisions: dict[str, float] = {}
    if thresholds is not None:
        it = getattr(thresholds, "image_threshold", None)
        pt = getattr(thresholds, "pixel_threshold", None)
        if it is not None:
            decisions["image_agreement"] = float(np.mean((r > it) == (c > it)))
        if pt is not None:
            decisions["pixel_agreement"] = float(np.mean((R > pt) == (C > pt)))
        if y is not None and it is not None:
            # What the deployed decisions achieve: the converted model at the stored thresholds.
            from edge_ad.calibration.thresholds import evaluate_thresholds

            achieved = evaluate_thresholds(thresholds, c, y, maps=C if has_pixels and pt is not None else None,
                                           masks=M if has_pixels and pt is not None else None)
            for key in ("image_fpr", "image_recall", "pixel_fpr", "pixel_recall"):
                value = getattr(achieved, key)
                if value is not None:
                    decisions[f"candidate_{key}"] = float(value)

    fmt = format or str(getattr(candidate, "format", None) or getattr(cand_run, "format", None) or "unknown")
    prec = precision or str(getattr(candidate, "precision", None) or getattr(cand_run, "precision", None) or "unknown")
    if description is None:
        description = repr(data) if hasattr(data, "paths") else type(data).__name__
    return FidelityReport(
        reference=reference_name,
        format=fmt,
        precision=prec,
        num_images=n,
        num_anomalous=int(y.sum()) if y is not None else None,
        input_size=(int(size[0]), int(size[1])),
        map=map_stats,
        score=score_stats,
        metrics=compared,
        decisions=decisions,
        worst_images=worst_images,
        validation_set={"files": files, "num_images": n, "hash": digest.hexdigest(), "description": description},
        preprocess=spec.to_dict(),
        extra=dict(extra or {}),
    )
