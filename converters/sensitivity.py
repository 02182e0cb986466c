"""Automatic INT8 sensitivity search: keep the most quantisation-sensitive blocks in floating point
until a fidelity budget holds. One search serves OpenVINO (NNCF) and TensorRT (Q/DQ ONNX).

Approach (one-at-a-time exclusion, then greedy fallback):

1. Quantise everything the backend's recipe allows; if the error against the FP32 reference is
   within the budget, stop (one conversion: the common case costs nothing extra).
2. Sensitivity of group *g* = ``error(all INT8) - error(all INT8 except g)`` - N more conversions
   for N groups. Measuring each group *with every other group quantised* is the configuration the
   fallback actually ships, so interactions through the residual stream (a block amplifying the
   error of the quantised blocks before it) are counted; "quantise only g" costs the same N
   conversions but measures g against a float context it will never run in.
3. Greedily keep the most sensitive groups in floating point (largest error drop first, ties by
   graph order), one conversion per step, until the budget holds or ``max_fallbacks`` groups are
   float. The first step reuses the sensitivity pass's conversion (results are cached by the set
   of excluded groups), so a search costs ``1 + N + (k - 1)`` conversions for k fallbacks.

Everything is deterministic: groups come in graph order, calibration data is fixed, ties keep
graph order.

Groups are module paths taken from the exported ONNX node names (``torch.onnx.export`` names nodes
``/module/path/Op`` and OpenVINO keeps the names): a quantisable node (``MatMul`` / ``Gemm`` /
``Conv`` with a constant weight) belongs to its deepest *block* (``/backbone/blocks.3/``,
``/backbone/blocks.1/blocks.1.0/`` for a CNN stage's block, ``/projector/blocks.0/``,
``/backbone/layer2/layer2.1/``) or, outside any block, to its own module (``/projector/embed/``).
Excluding a group = excluding every node whose name starts with the group's path.

Usage::

    groups = group_quantizable_nodes(onnx_path, include=VIT_QUANTIZABLE_SCOPES)
    quantize = openvino_quantizer(onnx_path, work_dir, calibration, transformer=True)
    result = sensitivity_search(onnxruntime_runner(onnx_path), quantize, validation, groups, max_error=0.002)
    ir = quantize.artifact(result.excluded)      # the IR that met the budget (or the best tried)
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BLOCK_PATTERN",
    "QUANTIZABLE_OP_TYPES",
    "OpenVINOQuantizer",
    "QDQQuantizer",
    "SensitivityResult",
    "group_quantizable_nodes",
    "map_cosine_error",
    "openvino_quantizer",
    "qdq_quantizer",
    "sensitivity_search",
]

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

#: Node types that carry INT8 weights (in both the NNCF and the Q/DQ recipes).
QUANTIZABLE_OP_TYPES: tuple[str, ...] = ("MatMul", "Gemm", "Conv")

#: A path component that is one block of a block container: timm / DINO ``blocks.3``, timm
#: EfficientNet ``blocks.1`` (stage) and ``blocks.1.0`` (block), torchvision ResNet ``layer2.1``,
#: ``layers.0``, ``stages.2``, torchvision MobileNet ``features.4``. The deepest such component of a
#: node name ends its group; ``mlp.0`` (a layer inside a block) is not one.
BLOCK_PATTERN = r"(?:blocks?|layers?|stages?|features|res)\d*(?:\.\d+)+"

#: Score-head nodes no backend quantises (same as :data:`edge_ad.converters.qdq.DEFAULT_EXCLUDE`):
#: top-level ops of the detector's ``forward``, the Gaussian smoother and the normaliser.
HEAD_EXCLUDE: tuple[str, ...] = (r"^/[^/]+$", r"^/smoother/", r"^/normalizer/")


# ---------------------------------------------------------------------------- grouping
def _group_of(name: str, block: re.Pattern[str]) -> str:
    parts = name.split("/")  # "/backbone/blocks.3/attn/qkv/MatMul" -> ["", "backbone", ..., "MatMul"]
    modules = parts[1:-1]
    for i in range(len(modules) - 1, -1, -1):
        if block.fullmatch(modules[i]):
            return "/" + "/".join(modules[: i + 1]) + "/"
    if modules:  # no block: the layer's own module
        return "/" + "/".join(modules) + "/"
    return name  # a top-level op (not a module path): the node itself


def group_quantizable_nodes(
    onnx_path: str | Path | Any,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = HEAD_EXCLUDE,
    block_pattern: str = BLOCK_PATTERN,
) -> dict[str, list[str]]:
    """Quantisable nodes of an exported detector, grouped by block.

    Args:
        onnx_path: ONNX file (or a loaded ``onnx.ModelProto``).
        include: node-name regexes matched at the start of the name (like
            :data:`edge_ad.converters.openvino.QUANTIZABLE_SCOPES`); None = every node. Pass the
            backend's quantisable scopes so that the search only spends conversions on groups the
            backend actually quantises.
        exclude: node-name regexes (``re.search``) never grouped (default: the score head).
        block_pattern: a path component that ends a group (see :data:`BLOCK_PATTERN`).

    Returns:
        ``{group path: [node names]}``, groups and nodes in graph order. A group path is a module
        prefix ending in ``/`` (e.g. ``/backbone/blocks.3/``); every node of the group starts with it.
    """
    import onnx

    from .trt_check import constant_values

    model = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(str(onnx_path))
    constants = constant_values(model)
    block = re.compile(block_pattern)
    inc = [re.compile(p) for p in include] if include is not None else None
    exc = [re.compile(p) for p in exclude]
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OP_TYPES or not node.name or len(node.input) < 2:
            continue
        if node.input[1] not in constants:  # activation x activation (attention products)
            continue
        if any(p.search(node.name) for p in exc) or (inc is not None and not any(p.match(node.name) for p in inc)):
            continue
        groups.setdefault(_group_of(node.name, block), []).append(node.name)
    return groups


# ---------------------------------------------------------------------------- error metric
def map_cosine_error(maps: np.ndarray, scores: np.ndarray, ref_maps: np.ndarray, ref_scores: np.ndarray) -> float:
    """``1 - cosine`` between all anomaly maps and the reference's, flattened (0 = identical).

    Meaningful on normalised maps (z-scores of good pixels, ``fit_normalization``): raw maps are
    all positive and any two of them have a cosine near 1.
    """
    a = np.asarray(maps, np.float64).ravel()
    b = np.asarray(ref_maps, np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    if denom == 0.0:
        return 0.0 if not a.any() and not b.any() else 1.0
    return float(1.0 - (a @ b) / denom)


# ---------------------------------------------------------------------------- the search
@dataclass
class SensitivityResult:
    """Outcome of :func:`sensitivity_search`.

    Attributes:
        excluded: groups kept in floating point, in the order they were added (empty: plain INT8).
        error: error of the final configuration (``excluded``) against the reference.
        budget_met: ``error <= max_error``.
        max_error: the budget.
        baseline_error: error with every group quantised.
        steps: ``[(excluded groups so far, error)]`` - step 0 is plain INT8, then one per fallback.
        sensitivity: group -> error drop when only that group is float (empty when plain INT8
            already met the budget: nothing was measured).
        conversions: number of conversions the search ran.
    """

    excluded: list[str]
    error: float
    budget_met: bool
    max_error: float
    baseline_error: float
    steps: list[tuple[list[str], float]] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    conversions: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["steps"] = [{"excluded": list(e), "error": float(err)} for e, err in self.steps]
        return d


def sensitivity_search(
    fp32_runner: Runner,
    quantize: Callable[[set[str]], Runner],
    images: np.ndarray,
    groups: Mapping[str, Sequence[str]] | Sequence[str],
    *,
    max_error: float,
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float] = map_cosine_error,
    max_fallbacks: int | None = None,
    progress: bool = True,
) -> SensitivityResult:
    """Find a small set of groups to keep in floating point so that INT8 meets ``max_error``.

    Args:
        fp32_runner: the reference (``images -> (maps, scores)``), e.g. the FP32 ONNX in onnxruntime.
        quantize: ``excluded groups -> runner`` of the model quantised with those groups left float
            (:func:`openvino_quantizer`, :func:`qdq_quantizer`, or any backend).
        images: float32 (N, 3, H, W) validation images, preprocessed like at run time (not the
            calibration images, not the test split).
        groups: candidate groups (the keys of :func:`group_quantizable_nodes`, or that dict), in
            graph order (ties keep this order).
        max_error: the budget: ``metric(...) <= max_error`` must hold.
        metric: ``(maps, scores, ref_maps, ref_scores) -> error`` (lower is better); default
            :func:`map_cosine_error`.
        max_fallbacks: at most this many groups are kept float (None = all of them).
        progress: show a tqdm bar (one tick per conversion).

    Returns:
        :class:`SensitivityResult`. When the budget cannot be met, ``excluded`` is the configuration
        with the lowest error seen and ``budget_met`` is False.
    """
    names = list(groups.keys()) if isinstance(groups, Mapping) else list(groups)
    if len(set(names)) != len(names):
        raise ValueError("groups must be unique")
    if max_error < 0:
        raise ValueError(f"max_error must be >= 0, got {max_error}")
    limit = len(names) if max_fallbacks is None else max(0, min(int(max_fallbacks), len(names)))
    images = np.ascontiguousarray(images, dtype=np.float32)
    ref_maps, ref_scores = fp32_runner(images)
    cache: dict[frozenset[str], float] = {}

    from tqdm.auto import tqdm

    bar = tqdm(total=1 + len(names), desc="INT8 sensitivity", unit="conversion", disable=not progress)

    def error(excluded: frozenset[str]) -> float:
        if excluded not in cache:
            bar.set_postfix_str(f"{len(excluded)} float group(s)")
            maps, scores = quantize(set(excluded))(images)
            cache[excluded] = float(metric(maps, scores, ref_maps, ref_scores))
            bar.update(1)
        return cache[excluded]

    try:
        baseline = error(frozenset())
        steps: list[tuple[list[str], float]] = [([], baseline)]
        if baseline <= max_error or limit == 0 or not names:
            return SensitivityResult([], baseline, baseline <= max_error, max_error, baseline, steps, {}, len(cache))
        sensitivity = {g: baseline - error(frozenset([g])) for g in names}
        order = sorted(names, key=lambda g: (-sensitivity[g], names.index(g)))
        bar.total = len(cache) + limit - 1
        bar.refresh()
        excluded: list[str] = []
        best = ([], baseline)
        for g in order[:limit]:
            excluded.append(g)
            err = error(frozenset(excluded))
            steps.append((list(excluded), err))
            if err < best[1]:
                best = (list(excluded), err)
            if err <= max_error:
                break
        final, final_err = (steps[-1][0], steps[-1][1]) if steps[-1][1] <= max_error else best
        bar.total = len(cache)
        bar.refresh()
        return SensitivityResult(final, final_err, final_err <= max_error, max_error, baseline, steps, sensitivity,
                                 len(cache))
    finally:
        bar.close()


# ---------------------------------------------------------------------------- backend adapters
def _key(excluded: set[str] | frozenset[str]) -> str:
    if not excluded:
        return "int8"
    return "int8-" + hashlib.sha1("\n".join(sorted(excluded)).encode()).hexdigest()[:12]


def _prefix_pattern(group: str) -> str:
    return re.escape(group) if group.endswith("/") else re.escape(group) + "$"


class _Quantizer:
    """``quantize(excluded) -> runner`` with the artifacts cached per excluded set under ``work_dir``."""

    def __init__(self, onnx_path: str | Path, work_dir: str | Path) -> None:
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.onnx_path}")
        self.work_dir = Path(work_dir)
        self.results: dict[frozenset[str], Any] = {}

    def artifact(self, excluded: Sequence[str] | set[str] = ()) -> Path:
        """The model file built for ``excluded`` (built now if it was not)."""
        key = frozenset(excluded)
        if key not in self.results:
            self.results[key] = self._build(set(key), self.work_dir / _key(key))
        return self._path(self.results[key])

    def __call__(self, excluded: set[str]) -> Runner:
        return self._runner(self.artifact(excluded))

    def _build(self, excluded: set[str], out: Path) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _path(self, result: Any) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    def _runner(self, path: Path) -> Runner:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenVINOQuantizer(_Quantizer):
    """NNCF INT8 through :func:`~edge_ad.converters.openvino.convert_openvino` with groups left float.

    Excluded groups are removed from the quantisable scopes by a negative lookahead in front of
    each scope (``(?!/backbone/blocks\\.3/)(?:/backbone/blocks\\.\\d+/...)``); ``_ignored_scope``
    then ignores every node whose name starts with no remaining scope. ``openvino.py`` is unchanged.
    """

    def __init__(self, onnx_path, work_dir, calibration_images, *, transformer=False, quantizable_scopes=None,
                 device="CPU", num_threads=0, **convert_kwargs) -> None:
        super().__init__(onnx_path, work_dir)
        from .openvino import QUANTIZABLE_SCOPES, VIT_QUANTIZABLE_SCOPES

        self.calibration_images = calibration_images
        self.transformer = transformer
        self.quantizable_scopes = tuple(quantizable_scopes if quantizable_scopes is not None
                                        else VIT_QUANTIZABLE_SCOPES if transformer else QUANTIZABLE_SCOPES)
        self.device, self.num_threads, self.convert_kwargs = device, num_threads, convert_kwargs

    def scopes(self, excluded: set[str] | Sequence[str]) -> tuple[str, ...]:
        """The ``quantizable_scopes`` that leave ``excluded`` groups in floating point."""
        if not excluded:
            return self.quantizable_scopes
        ban = "|".join(f"(?:{_prefix_pattern(g)})" for g in sorted(excluded))
        return tuple(f"(?!{ban})(?:{s})" for s in self.quantizable_scopes)

    def _build(self, excluded, out):
        from .openvino import convert_openvino

        return convert_openvino(self.onnx_path, out, precision="int8", calibration_images=self.calibration_images,
                                transformer=self.transformer, device=self.device,
                                quantizable_scopes=self.scopes(excluded), **self.convert_kwargs)

    def _path(self, result) -> Path:
        return result.xml

    def _runner(self, path: Path) -> Runner:
        from .openvino import openvino_runner

        result = next(r for r in self.results.values() if r.xml == path)
        return openvino_runner(path, device=self.device, precision_hint=result.inference_precision_hint,
                               num_threads=self.num_threads)


class QDQQuantizer(_Quantizer):
    """Q/DQ INT8 ONNX (TensorRT explicit quantisation) through
    :func:`~edge_ad.converters.qdq.quantize_qdq`, excluded groups added to its ``exclude`` regexes
    (``re.search`` on node names, so each group becomes ``^<escaped group path>``). Checked in
    onnxruntime (the TensorRT numerics proxy on a host without TensorRT)."""

    def __init__(self, onnx_path, work_dir, calibration_images, *, exclude=None, providers=("CPUExecutionProvider",),
                 **qdq_kwargs) -> None:
        super().__init__(onnx_path, work_dir)
        from .qdq import DEFAULT_EXCLUDE

        self.calibration_images = calibration_images
        self.exclude = tuple(DEFAULT_EXCLUDE if exclude is None else exclude)
        self.providers, self.qdq_kwargs = tuple(providers), qdq_kwargs

    def patterns(self, excluded: set[str] | Sequence[str]) -> tuple[str, ...]:
        """The ``exclude`` regexes that leave ``excluded`` groups in floating point."""
        return self.exclude + tuple("^" + _prefix_pattern(g) for g in sorted(excluded))

    def _build(self, excluded, out):
        from .qdq import quantize_qdq

        return quantize_qdq(self.onnx_path, out / "model.onnx", self.calibration_images,
                            exclude=self.patterns(excluded), **self.qdq_kwargs)

    def _path(self, result) -> Path:
        return Path(result.onnx_path)

    def _runner(self, path: Path) -> Runner:
        from .fidelity import onnxruntime_runner

        return onnxruntime_runner(path, self.providers)


def openvino_quantizer(onnx_path: str | Path, work_dir: str | Path, calibration_images: np.ndarray, *,
                       transformer: bool = False, **kwargs: Any) -> OpenVINOQuantizer:
    """``quantize(excluded groups) -> runner`` for :func:`sensitivity_search` on OpenVINO INT8.

    ``kwargs`` go to :class:`OpenVINOQuantizer` (``quantizable_scopes``, ``device``, ``num_threads``)
    and on to :func:`~edge_ad.converters.openvino.convert_openvino` (``preset``,
    ``fast_bias_correction``): search with the settings the bundle will be built with. IRs land in
    ``work_dir/int8[-<hash>]/``; ``.artifact(result.excluded)`` is the chosen one.
    """
    return OpenVINOQuantizer(onnx_path, work_dir, calibration_images, transformer=transformer, **kwargs)


def qdq_quantizer(onnx_path: str | Path, work_dir: str | Path, calibration_images: np.ndarray,
                  **kwargs: Any) -> QDQQuantizer:
    """``quantize(excluded groups) -> runner`` for :func:`sensitivity_search` on Q/DQ INT8 ONNX.

    ``kwargs`` go to :class:`QDQQuantizer` (``exclude`` = the base patterns, default
    :data:`~edge_ad.converters.qdq.DEFAULT_EXCLUDE`; ``providers``) and on to
    :func:`~edge_ad.converters.qdq.quantize_qdq` (``method``, ``min_channels``, ...). Models land
    in ``work_dir/int8[-<hash>]/model.onnx``; ``.artifact(result.excluded)`` is the chosen one.
    """
    return QDQQuantizer(onnx_path, work_dir, calibration_images, **kwargs)
