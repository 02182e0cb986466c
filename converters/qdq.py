"""Explicit-quantization (Q/DQ) ONNX for TensorRT INT8.

TensorRT builds INT8 engines from ONNX graphs that carry ``QuantizeLinear`` / ``DequantizeLinear``
(Q/DQ) pairs ("explicit quantization"): each pair says *where* INT8 is allowed and with which
scale. This replaces TensorRT's implicit INT8 calibrator (deprecated in TensorRT 10, gone in 11),
and the same Q/DQ graph runs in onnxruntime, which is how it is checked numerically here.

The recipe (what holds on ViTs, see e.g. the published ViT-B/16 on Orin Nano: 5.7 ms FP16 vs
4.9 ms with INT8 Linear layers only; quantising the residual Adds as well collapses accuracy):

* **INT8**: the inputs of ``MatMul`` / ``Gemm`` / ``Conv`` nodes with constant weights (the
  Linear and convolution layers), weights per output channel, activations per tensor; all
  symmetric (zero point 0, TensorRT supports nothing else), signed INT8.
* **float** (FP16 / FP32 in the engine): residual ``Add``\\ s (no Q/DQ on the residual stream),
  LayerNorm and other normalisations, Softmax, the attention matmuls between two activations, and
  the score head (everything the detector computes after its feature extractor and projector:
  the residual ``|f - P(f)|^2``, top-k, upsampling, smoothing and normalisation).

Two back ends:

* NVIDIA ModelOpt (``modelopt.onnx.quantization``) when installed: NVIDIA's own PTQ for TensorRT.
  It cannot be tested on a machine without it; it is import-guarded and gets the same plan and
  post-processing as the onnxruntime path.
* onnxruntime's static QDQ quantiser otherwise (``quantize_static``, ``QuantFormat.QDQ``), tested
  for real in ``tests/test_qdq.py``.

Both are followed by one post-pass. onnxruntime wires *every* consumer of a quantised activation
to its Q/DQ copy: FoundAD's backbone features ``f`` feed both the projector's first Linear
(quantised) and the residual ``f - P(f)`` (must stay float); an MBConv block's output feeds the
next 1 x 1 conv and the skip ``Add``. The post-pass rewires every node that is not a quantisation
target back to the float tensor, so Q/DQ sits only in front of the target nodes (and it is a
no-op where a quantiser already did so).

Calibration is done here, not by onnxruntime: only the tensors that get Q/DQ are collected,
percentile and entropy work on a 2048-bin |x| histogram like TensorRT's calibrators, and the
resulting symmetric ranges are handed to ``quantize_static`` (its own entropy calibration runs
with 128 bins and 128 levels inside ``quantize_static``, i.e. degenerates to min/max, and is pure
Python: a minute on a three-block ViT).
"""
from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .trt_check import constant_values

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEPTHWISE_REASON",
    "INPUT_LAYER_REASON",
    "METHODS",
    "QUANTIZED_OP_TYPES",
    "QDQResult",
    "QuantizationPlan",
    "float_layers_by_role",
    "plan_quantization",
    "quantize_qdq",
    "strip_qdq_from_unquantized_consumers",
]


#: Node types whose constant weights (and activation input) get INT8 Q/DQ.
QUANTIZED_OP_TYPES: tuple[str, ...] = ("MatMul", "Conv", "Gemm")

#: Calibration methods: ``minmax`` (max |x| seen), ``percentile`` (99.99th percentile of |x|,
#: robust to rare outliers), ``entropy`` (KL-divergence optimal clipping, TensorRT's classic choice).
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy")

#: Node-name patterns (``re.search``) never quantised: the score head of an ``edge_ad`` detector
#: exported by ``torch.onnx.export``. Nodes of submodules are named ``/module/.../Op``; ops the
#: detector's own ``forward`` runs (``f - P(f)``, ``pow``, ``mean``, ``topk``, the upsampling) are
#: top level (``/Sub``, ``/TopK``); ``smoother`` (Gaussian convs) and ``normalizer`` are the
#: contract's head modules (``edge_ad.methods.base.AnomalyDetector``).
DEFAULT_EXCLUDE: tuple[str, ...] = (r"^/[^/]+$", r"^/smoother/", r"^/normalizer/")

_BACKENDS = ("auto", "onnxruntime", "modelopt")
# Below this GEMM size (reduction K or output channels N) a layer gains nothing from INT8 tensor
# cores (they pad to 32 anyway) and only adds error: e.g. 1-channel smoothing convs.
_DEFAULT_MIN_CHANNELS = 8
# Percentile calibration keeps 99.99 % of |x| (a common setting in NVIDIA's PTQ examples; 99.999
# keeps almost the max with a few dozen calibration images).
_PERCENTILE = 99.99


@dataclass
class QuantizationPlan:
    """Which nodes of a graph get INT8 Q/DQ.

    Attributes:
        targets: names of the ``MatMul`` / ``Gemm`` / ``Conv`` nodes to quantise (graph order).
        excluded: candidate node name -> why it stays float.
    """

    targets: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)


@dataclass
class QDQResult:
    """What :func:`quantize_qdq` wrote.

    Attributes:
        onnx_path: the Q/DQ ONNX file.
        backend: ``"onnxruntime"`` or ``"modelopt"``.
        method: calibration method (one of :data:`METHODS`).
        per_channel: weights quantised per output channel.
        num_calibration_images: images the activation ranges were calibrated on.
        quantized_nodes: nodes whose weight and activation inputs are INT8 (graph order).
        excluded_nodes: candidate nodes left float, with the reason.
        restored_float_inputs: inputs of float nodes (residual Adds, ``f - P(f)``, ...) the post-pass
            rewired from a Q/DQ copy back to the float tensor.
        opset: default-domain opset of the written model.
    """

    onnx_path: Path
    backend: str
    method: str
    per_channel: bool
    num_calibration_images: int
    quantized_nodes: list[str]
    excluded_nodes: dict[str, str]
    restored_float_inputs: int
    opset: int

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for a bundle's manifest / JSON)."""
        return {
            "tool": f"edge_ad.converters.qdq ({self.backend})",
            "onnx_path": str(self.onnx_path),
            "backend": self.backend,
            "method": self.method,
            "per_channel": self.per_channel,
            "num_calibration_images": self.num_calibration_images,
            "quantized_nodes": list(self.quantized_nodes),
            "excluded_nodes": dict(self.excluded_nodes),
            "restored_float_inputs": self.restored_float_inputs,
            "opset": self.opset,
        }


# ---------------------------------------------------------------------------- graph helpers
def _opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _name_unnamed_nodes(model: Any) -> None:
    """Give every node a unique name: plans, exclusions and reports address nodes by name."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)




def _constants_to_initializers(model: Any, names: set[str]) -> None:
    """Turn the ``Constant`` nodes producing ``names`` into initializers.

    Quantisers quantise a weight only when it is an initializer; a torch export sometimes emits a
    weight as a ``Constant`` node (e.g. buffers created in ``forward``).
    """
    from onnx import numpy_helper

    keep = []
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in names:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensor = numpy_helper.from_array(numpy_helper.to_array(value), node.output[0])
                model.graph.initializer.append(tensor)
                continue
        keep.append(node)
    if len(keep) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(keep)


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _gemm_dims(node: Any, weight: np.ndarray) -> tuple[int, int]:
    """(reduction size K, output channels N) of the GEMM a weight-bearing node runs."""
    if node.op_type == "Conv":
        # (O, I / group, kh, kw): each output sums over I / group * kh * kw products. A ViT's
        # patch embedding (3 channels, 14 x 14 kernel) is a K = 588 GEMM worth quantising; a
        # depthwise 3 x 3 conv has K = 9.
        return int(np.prod(weight.shape[1:])), int(weight.shape[0])
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return int(weight.shape[1]), int(weight.shape[0])  # B is (N, K)
    return int(weight.shape[-2]), int(weight.shape[-1])  # MatMul / Gemm: B is (K, N)


# Ops between the graph input and the first layer that keep it "the raw image" (padding, casts,
# layout, in-graph normalisation with constants).
_INPUT_PASSTHROUGH = frozenset({"Pad", "Cast", "Identity", "Reshape", "Transpose", "Slice", "Mul", "Div", "Sub", "Add"})


def _reads_graph_input(model: Any, tensor: str, constants: dict[str, np.ndarray]) -> bool:
    """``tensor`` is a graph input, or derived from one by padding / layout / constant arithmetic."""
    inputs = {i.name for i in model.graph.input} - set(constants)
    producer = {o: n for n in model.graph.node for o in n.output}
    for _ in range(16):
        if tensor in inputs:
            return True
        node = producer.get(tensor)
        if node is None or node.op_type not in _INPUT_PASSTHROUGH:
            return False
        variable = [i for i in node.input if i and not _is_shape_value(i, producer, constants)]
        if len(variable) != 1:
            return False
        tensor = variable[0]
    return False


def _is_shape_value(name: str, producer: dict[str, Any], constants: dict[str, np.ndarray]) -> bool:
    """``name`` is computed from constants and shapes only (e.g. TF "same" pads from ``Shape``)."""
    stack, seen = [name], set()
    while stack:
        tensor = stack.pop()
        if tensor in seen or tensor in constants:
            continue
        seen.add(tensor)
        node = producer.get(tensor)
        if node is None:
            return False  # a graph input: pixel values
        if node.op_type in ("Shape", "Size", "Constant"):
            continue
        stack.extend(i for i in node.input if i)
        if len(seen) > 256:
            return False
    return True


def plan_quantization(
    model: Any,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    *,
    min_channels: int = _DEFAULT_MIN_CHANNELS,
    keep_input_layers: bool = True,
    quantize_depthwise: bool = False,
) -> QuantizationPlan:
    """Decide which nodes get INT8 Q/DQ (pure graph analysis, no calibration).

    A node is a target when it is a ``MatMul`` / ``Gemm`` / ``Conv`` with a constant weight whose
    GEMM has a reduction size K and an output width N of at least ``min_channels`` (for a conv,
    K = input channels per group x kernel area), its name matches none of ``exclude``, it is not
    a depthwise conv (unless ``quantize_depthwise``) and (with ``keep_input_layers``) it does not
    read the input image itself.

    Args:
        model: ``onnx.ModelProto`` (nodes must be named; :func:`quantize_qdq` names unnamed ones).
        exclude: regular expressions searched in node names (see :data:`DEFAULT_EXCLUDE`).
        min_channels: smallest GEMM size (K and N) worth quantising.
        keep_input_layers: keep layers reading the image (a ViT's patch embedding, a CNN's stem)
            float. Measured on a DINOv2-shaped FoundAD: INT8 on the patch embedding alone cost
            more than all other layers together (anomaly-map cosine 0.995 vs 0.999), for well
            under 1 % of the compute.
        quantize_depthwise: also quantise depthwise convs (one input channel per group). Off by
            default: they are memory-bound (little INT8 gain) and the most quantisation-sensitive
            layers of EfficientNet / MobileNet. Measured on an EfficientNet-Lite0 FoundAD
            (ImageNet weights, real images): anomaly-map cosine 0.960 with them, 0.996 without.
    """
    patterns = [re.compile(p) for p in exclude]
    constants = constant_values(model)
    plan = QuantizationPlan()
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES:
            continue
        hit = next((p.pattern for p in patterns if p.search(node.name)), None)
        weight = constants.get(node.input[1]) if len(node.input) > 1 else None
        if hit is not None:
            plan.excluded[node.name] = f"name matches exclude pattern {hit!r} (score head)"
        elif weight is None:
            # q @ k^T and attn @ v: two activations, per-tensor INT8 on softmax output loses the
            # small attention weights; TensorRT's fused attention runs them in FP16 anyway.
            plan.excluded[node.name] = "no constant weight (activation x activation matmul, e.g. attention)"
        elif weight.ndim < 2:
            plan.excluded[node.name] = f"weight of rank {weight.ndim}"
        elif node.op_type == "MatMul" and weight.ndim != 2:
            plan.excluded[node.name] = f"batched constant weight {weight.shape}: no per-channel axis TensorRT accepts"
        elif min(_gemm_dims(node, weight)) < min_channels:
            k, n = _gemm_dims(node, weight)
            plan.excluded[node.name] = (
                f"GEMM of K = {k}, N = {n} (< {min_channels}): no INT8 speed-up, only quantisation error"
            )
        elif (role := _float_role(model, node, weight, constants, keep_input_layers=keep_input_layers,
                                  quantize_depthwise=quantize_depthwise)) is not None:
            plan.excluded[node.name] = role
        else:
            plan.targets.append(node.name)
    return plan


#: Why a layer stays float by its role in the graph (shared by the Q/DQ and the OpenVINO recipes).
DEPTHWISE_REASON = "depthwise conv: memory-bound, little INT8 gain, most quantisation error"
INPUT_LAYER_REASON = "reads the input image (patch embedding / stem): most error, least compute"


def _is_depthwise(node: Any, weight: np.ndarray) -> bool:
    return node.op_type == "Conv" and int(_attr(node, "group", 1)) > 1 and weight.shape[1] == 1


def _float_role(model: Any, node: Any, weight: np.ndarray, constants: dict[str, np.ndarray], *,
                keep_input_layers: bool, quantize_depthwise: bool) -> str | None:
    if not quantize_depthwise and _is_depthwise(node, weight):
        return DEPTHWISE_REASON
    if keep_input_layers and _reads_graph_input(model, node.input[0], constants):
        return INPUT_LAYER_REASON
    return None


def float_layers_by_role(
    model: Any, *, keep_input_layers: bool = True, quantize_depthwise: bool = False
) -> dict[str, str]:
    """Weight-bearing layers that stay float because of what they are, not what they are called.

    Args:
        model: ``onnx.ModelProto`` or path of an exported detector.
        keep_input_layers: list the layers reading the input image (a CNN's stem, a ViT's patch
            embedding).
        quantize_depthwise: False lists the depthwise convs too.

    Returns:
        ``{node name: reason}`` in graph order (:data:`INPUT_LAYER_REASON`, :data:`DEPTHWISE_REASON`).
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    constants = constant_values(model)
    roles: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OP_TYPES or len(node.input) < 2 or not node.name:
            continue
        weight = constants.get(node.input[1])
        if weight is None or weight.ndim < 2:
            continue
        role = _float_role(model, node, weight, constants, keep_input_layers=keep_input_layers,
                           quantize_depthwise=quantize_depthwise)
        if role is not None:
            roles[node.name] = role
    return roles


def strip_qdq_from_unquantized_consumers(model: Any, targets: Sequence[str]) -> int:
    """Feed every non-target node the float tensor instead of a Q/DQ'd copy; drop dead Q/DQ.

    An activation Q/DQ pair is ``x -> QuantizeLinear -> DequantizeLinear -> consumer``. Weight
    ``DequantizeLinear`` nodes (INT8 initializer input, no ``QuantizeLinear``) are left alone.

    Returns:
        The number of node inputs rewired to the float tensor.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    target_set = set(targets)
    rewired = 0
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.name in target_set:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
                rewired += 1
    # Remove Q/DQ nodes nobody reads any more (DQ first, then its Q), until nothing changes.
    graph_outputs = {o.name for o in model.graph.output}
    while True:
        used = {name for n in model.graph.node for name in n.input} | graph_outputs
        dead = [
            n for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in used for o in n.output)
        ]
        if not dead:
            break
        dead_ids = {id(n) for n in dead}
        keep = [n for n in model.graph.node if id(n) not in dead_ids]
        del model.graph.node[:]
        model.graph.node.extend(keep)
    # Scales / zero points of the removed pairs.
    used = {name for n in model.graph.node for name in n.input} | graph_outputs
    inits = [t for t in model.graph.initializer if t.name in used]
    if len(inits) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(inits)
    return rewired


# ---------------------------------------------------------------------------- calibration data
def _image_input(model: Any) -> tuple[str, list[int | None]]:
    """Name and shape (None for symbolic dims) of the single image input (B, 3, H, W)."""
    init_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ValueError(
            f"expected one image input (B, 3, H, W), the model has {len(inputs)}: {[i.name for i in inputs]}"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]
    return inputs[0].name, shape


def _check_images(images: np.ndarray, shape: list[int | None]) -> np.ndarray:
    if not isinstance(images, np.ndarray):
        raise TypeError(f"calibration_images must be a numpy array (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"calibration_images must be (N, 3, H, W) with N >= 1, got shape {images.shape}")
    if len(shape) != 4:
        raise ValueError(f"the model's image input has rank {len(shape)}, expected (B, 3, H, W)")
    for axis in (1, 2, 3):
        if shape[axis] is not None and shape[axis] != images.shape[axis]:
            raise ValueError(
                f"calibration_images {images.shape[1:]} do not match the model input (C, H, W) = {tuple(shape[1:])}; "
                "preprocess them with the detector's PreprocessSpec"
            )
    if not np.isfinite(images).all():
        raise ValueError("calibration_images contain NaN or Inf")
    return np.ascontiguousarray(images, dtype=np.float32)


def _batches(images: np.ndarray, batch: int | None) -> Iterator[np.ndarray]:
    """Calibration batches: the model's static batch size, or up to 8 images if the batch is free."""
    if batch is None:
        for i in range(0, len(images), 8):
            yield images[i : i + 8]
        return
    if len(images) < batch:
        raise ValueError(f"the model has a static batch of {batch}; got only {len(images)} calibration images")
    for i in range(0, len(images) - batch + 1, batch):  # a remainder smaller than the batch is dropped
        yield images[i : i + batch]


# ---------------------------------------------------------------------------- back ends
def _modelopt_available() -> bool:
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def _activation_inputs(model: Any, targets: Sequence[str]) -> list[str]:
    """Activation tensors that get a Q/DQ pair: input 0 of every target (input 1 is the weight)."""
    by_name = {n.name: n for n in model.graph.node}
    names: list[str] = []
    for t in targets:
        name = by_name[t].input[0]
        if name not in names:
            names.append(name)
    return names


def _entropy_amax(hist: np.ndarray, edges: np.ndarray, *, num_quantized_bins: int = 128, stride: int = 4) -> float:
    """TensorRT's entropy calibration: the |x| clipping threshold whose 128-level quantisation of
    the histogram loses the least information (minimum KL divergence; Migacz, GTC 2017).

    Args:
        hist: (bins,) counts of |x| over ``edges``.
        edges: (bins + 1,) bin edges, from 0 to max |x|.
        num_quantized_bins: quantisation levels of |x| (INT8 symmetric: 128).
        stride: candidate thresholds are every ``stride``-th bin edge (speed; 2048 bins / 4).
    """
    hist = hist.astype(np.float64)
    n = hist.size
    # The exact zeros of ReLU-like outputs pile up in bin 0; they quantise exactly whatever the
    # threshold, but their mass would dominate the divergence and pull the threshold far down
    # (measured: ReLU6 outputs clipped at 0.6 instead of 6). Count bin 0 like its neighbour.
    if n > 1:
        hist[0] = hist[1]
    if n <= num_quantized_bins or hist.sum() == 0:
        return float(edges[-1])
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])
    best_i, best_kl = n, np.inf
    for i in list(range(num_quantized_bins, n, stride)) + [n]:
        p = hist[:i].copy()
        p[-1] += tail[i]  # clipped outliers land in the last bin
        nonzero = p > 0
        bounds = (np.arange(num_quantized_bins + 1) * i) // num_quantized_bins
        merged = np.add.reduceat(hist[:i], bounds[:-1])
        counts = np.add.reduceat(nonzero.astype(np.float64), bounds[:-1])
        group = np.repeat(np.arange(num_quantized_bins), np.diff(bounds))
        q = np.where(nonzero, merged[group] / np.maximum(counts[group], 1.0), 0.0)
        if q.sum() == 0:
            continue
        p, q = p / p.sum(), q / q.sum()
        m = p > 0
        if np.any(q[m] == 0):
            continue  # infinite divergence
        kl = float(np.sum(p[m] * np.log(p[m] / q[m])))
        if kl <= best_kl:  # ties: the larger threshold (clip less)
            best_i, best_kl = i, kl
    return float(edges[best_i])


def _calibrate(
    model_path: Path, input_name: str, tensors: list[str], batches: list[np.ndarray], method: str
) -> dict[str, float]:
    """Symmetric range (max |x| to keep) of each tensor, over the calibration batches.

    Runs only the tensors that get Q/DQ (exposed as extra graph outputs of a copy of the model):
    one pass for ``minmax``, a second one filling a 2048-bin |x| histogram on [0, max] for
    ``percentile`` / ``entropy`` (the histogram scheme of TensorRT's calibrators).
    onnxruntime's own histogram calibrators are not used: in ``quantize_static`` its entropy
    method runs with 128 bins and 128 levels, i.e. degenerates to min/max, and it is pure Python
    (minutes on a ViT).
    """
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    outputs = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in outputs:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    amax = dict.fromkeys(tensors, 0.0)
    for batch in batches:
        for name, value in zip(tensors, session.run(tensors, {input_name: batch})):
            amax[name] = max(amax[name], float(np.max(np.abs(value))) if value.size else 0.0)
    if method == "minmax":
        return amax

    bins = 2048
    hists = {name: np.zeros(bins, dtype=np.int64) for name in tensors}
    for batch in batches:
        for name, value in zip(tensors, session.run(tensors, {input_name: batch})):
            if amax[name] > 0:
                hists[name] += np.histogram(np.abs(value), bins=bins, range=(0.0, amax[name]))[0]
    ranges: dict[str, float] = {}
    for name in tensors:
        edges = np.linspace(0.0, amax[name], bins + 1)
        hist = hists[name]
        if amax[name] == 0 or hist.sum() == 0:
            ranges[name] = amax[name]
        elif method == "percentile":
            cdf = np.cumsum(hist) / hist.sum()
            ranges[name] = float(edges[min(int(np.searchsorted(cdf, _PERCENTILE / 100.0)) + 1, bins)])
        else:
            ranges[name] = _entropy_amax(hist, edges)
    return ranges


def _run_onnxruntime(
    src: Path, dst: Path, plan: QuantizationPlan, ranges: dict[str, float], per_channel: bool,
    input_name: str, batches: list[np.ndarray],
) -> None:
    """onnxruntime's QDQ quantiser with the given activation ranges (no calibration of its own)."""
    import inspect

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    # A zero range (a tensor that was always 0 in calibration) would give scale 0.
    tiny = np.finfo(np.float32).tiny
    extra: dict[str, Any] = {
        # TensorRT: symmetric INT8 (zero point 0) for activations and weights.
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        # Linear layers only; q @ k^T / attn @ v stay float (see plan_quantization).
        "MatMulConstBOnly": True,
        # TensorRT has no INT32 DequantizeLinear: biases stay float (it fuses them into the GEMM).
        "QuantizeBias": False,
        # Q/DQ on inputs only: an INT8 output would quantise the residual stream / bias Add.
        "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OP_TYPES),
        # One pair per consumer, so the post-pass can strip the float consumers' pairs one by one.
        "DedicatedQDQPair": True,
        # Output-channel axes TensorRT accepts: MatMul weights are (K, N) -> axis 1 (Conv: 0).
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
    }
    kwargs: dict[str, Any] = dict(
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        nodes_to_quantize=list(plan.targets),
        per_channel=per_channel,
        reduce_range=False,  # 7-bit weights are a workaround for old x86 CPUs, not for GPUs
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options=extra,
    )
    with tempfile.TemporaryDirectory(prefix="edge_ad_calib_") as tmp:
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            # The ranges computed above, in onnxruntime's calibration cache: it skips its own pass.
            from onnxruntime.quantization.calibrate import save_tensors_data

            data = {
                name: TensorData(lowest=np.float32(-max(a, tiny)), highest=np.float32(max(a, tiny)))
                for name, a in ranges.items()
            }
            cache = Path(tmp) / "calibration.json"
            save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
            quantize_static(str(src), str(dst), None, calibration_cache_path=str(cache), **kwargs)
        else:  # pragma: no cover - onnxruntime without calibration caches
            # Same ranges as overrides; onnxruntime still runs (and ignores) a min/max pass.
            extra["TensorQuantOverrides"] = {
                name: [{"rmin": np.float32(-max(a, tiny)), "rmax": np.float32(max(a, tiny))}]
                for name, a in ranges.items()
            }

            class _Reader(CalibrationDataReader):
                def __init__(self) -> None:
                    self._it = iter(batches)

                def get_next(self) -> dict[str, np.ndarray] | None:
                    batch = next(self._it, None)
                    return None if batch is None else {input_name: batch}

            quantize_static(str(src), str(dst), _Reader(), **kwargs)


def _run_modelopt(
    src: Path, dst: Path, input_name: str, images: np.ndarray, plan: QuantizationPlan, method: str
) -> None:  # pragma: no cover - needs nvidia-modelopt, not installed in CI
    import inspect

    from modelopt.onnx.quantization import quantize as mo_quantize

    if method == "percentile":
        raise ValueError("ModelOpt's INT8 PTQ calibrates with 'minmax' or 'entropy'; use backend='onnxruntime' for 'percentile'")
    kwargs: dict[str, Any] = dict(
        onnx_path=str(src),
        quantize_mode="int8",
        calibration_data={input_name: images},
        calibration_method={"minmax": "max", "entropy": "entropy"}[method],
        op_types_to_quantize=list(QUANTIZED_OP_TYPES),
        output_path=str(dst),
    )
    accepted = inspect.signature(mo_quantize).parameters
    # Parameters that appeared over ModelOpt releases: pass them only where they exist.
    optional = {
        "nodes_to_quantize": [f"^{re.escape(n)}$" for n in plan.targets],
        "nodes_to_exclude": [f"^{re.escape(n)}$" for n in plan.excluded],
        # Keep the float parts FP32 in the ONNX: TensorRT 10 picks FP16 per layer itself and the
        # FP32 islands (LayerNorm, Softmax, residual) come from layer precision constraints.
        "high_precision_dtype": "fp32",
    }
    kwargs.update({k: v for k, v in optional.items() if k in accepted})
    mo_quantize(**kwargs)


def _upgrade_opset(model: Any, target: int) -> Any:
    """The model converted to default-domain opset ``target`` (no-op when already there).

    The ModelOpt path runs on opset >= 19 (the opset where Q/DQ gained FP8, which ModelOpt's ONNX
    passes are written for; how a release handles older opsets varies, so the conversion happens
    here, where it is tested); ``torch.onnx.export(dynamo=False)`` writes 17.
    """
    from onnx import version_converter

    if _opset(model) >= target:
        return model
    return version_converter.convert_version(model, target)


def _preprocess(src: Path, dst: Path) -> None:
    """onnxruntime's quantisation preprocessing, reduced to ONNX shape inference.

    Skipped on purpose: ORT's graph optimiser (it fuses ops into ``com.microsoft`` contrib ops
    TensorRT cannot parse and renames the nodes the plan refers to) and its symbolic shape
    inference (when incomplete, e.g. on TF "same" pads computed from ``Shape``, it raises and
    leaves ``sym_shape_infer_temp.onnx`` + a data file in the current directory). The quantiser
    only needs tensor types, which ONNX shape inference provides.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_optimization=True, skip_symbolic_shape=True)


# ---------------------------------------------------------------------------- entry point
def quantize_qdq(
    onnx_in: str | Path,
    onnx_out: str | Path,
    calibration_images: np.ndarray,
    *,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    method: str = "minmax",
    per_channel: bool = True,
    backend: str = "auto",
    min_channels: int = _DEFAULT_MIN_CHANNELS,
    keep_input_layers: bool = True,
    quantize_depthwise: bool = False,
) -> QDQResult:
    """Write a TensorRT-ready explicit-quantization (Q/DQ) INT8 copy of an FP32 ONNX model.

    Args:
        onnx_in: FP32 ONNX of a detector (``images`` (B, 3, H, W) -> outputs), static shapes.
        onnx_out: where to write the Q/DQ ONNX (parent folders are created).
        calibration_images: (N, 3, H, W) float32 images preprocessed exactly like at run time
            (the detector's ``PreprocessSpec``, e.g. ``edge_ad.runtime.preprocess_batch``); a few
            dozen good images of the product are typical. With a static batch b in the model,
            ``N // b`` batches are used.
        exclude: node-name regular expressions kept float (default: the detector's score head).
        method: activation calibration, one of :data:`METHODS`.
        per_channel: per-output-channel weight scales (TensorRT's recommendation; per-tensor
            weight scales cost accuracy for nothing). ModelOpt always quantises weights per channel.
        backend: ``"auto"`` (ModelOpt when installed, else onnxruntime), ``"onnxruntime"``,
            ``"modelopt"``.
        min_channels, keep_input_layers, quantize_depthwise: see :func:`plan_quantization`.

    Returns:
        :class:`QDQResult`.

    Raises:
        ValueError: bad arguments, images that do not match the model input.
        ImportError: ``backend="modelopt"`` without ModelOpt installed.
    """
    import onnx

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "modelopt" and not _modelopt_available():
        raise ImportError("backend='modelopt' needs NVIDIA ModelOpt: pip install nvidia-modelopt[onnx]")
    if backend == "auto":
        backend = "modelopt" if _modelopt_available() and method != "percentile" else "onnxruntime"
    if isinstance(exclude, str):
        exclude = (exclude,)
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)

    model = onnx.load(str(onnx_in))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise ValueError(f"{onnx_in} is already quantised (has Q/DQ nodes); pass the FP32 export")
    _name_unnamed_nodes(model)
    input_name, shape = _image_input(model)
    images = _check_images(calibration_images, shape)
    batches = list(_batches(images, shape[0]))
    used = sum(len(b) for b in batches)

    plan = plan_quantization(
        model, exclude, min_channels=min_channels, keep_input_layers=keep_input_layers,
        quantize_depthwise=quantize_depthwise,
    )
    if not plan.targets:
        raise ValueError(
            f"nothing to quantise in {onnx_in}: no MatMul / Gemm / Conv with a constant weight outside {list(exclude)}"
        )
    # Weights the quantiser must see as initializers.
    by_name = {n.name: n for n in model.graph.node}
    _constants_to_initializers(model, {by_name[t].input[1] for t in plan.targets})

    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge_ad_qdq_") as tmp:
        named = Path(tmp) / "named.onnx"
        pre = Path(tmp) / "pre.onnx"
        raw = Path(tmp) / "qdq_raw.onnx"
        if backend == "modelopt":  # pragma: no cover - needs nvidia-modelopt
            onnx.save(_upgrade_opset(model, 19), str(named))
            _run_modelopt(named, raw, input_name, np.concatenate(batches), plan, method)
        else:
            onnx.save(model, str(named))
            _preprocess(named, pre)
            ranges = _calibrate(pre, input_name, _activation_inputs(model, plan.targets), batches, method)
            _run_onnxruntime(pre, raw, plan, ranges, per_channel, input_name, batches)
        quantized = onnx.load(str(raw))

    restored = strip_qdq_from_unquantized_consumers(quantized, plan.targets)
    quantized.producer_name = "edge_ad.converters.qdq"
    onnx.checker.check_model(quantized)
    onnx.save(quantized, str(onnx_out))

    from .trt_check import qdq_summary

    summary = qdq_summary(quantized)
    done = [t for t in plan.targets if t in summary.quantized_weight_nodes]
    missing = [t for t in plan.targets if t not in summary.quantized_weight_nodes]
    excluded = dict(plan.excluded)
    for name in missing:  # the quantiser declined (e.g. an op it cannot handle): report, do not hide
        excluded[name] = f"{backend} did not quantise it"
    return QDQResult(
        onnx_path=onnx_out,
        backend=backend,
        method=method,
        per_channel=per_channel,
        num_calibration_images=used,
        quantized_nodes=done,
        excluded_nodes=excluded,
        restored_float_inputs=restored,
        opset=_opset(quantized),
    )
