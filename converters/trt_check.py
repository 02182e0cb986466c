"""Will TensorRT 10 build this ONNX the way edge_ad expects? Static checks, no TensorRT needed.

:func:`check_tensorrt_compatible` lists problems (an empty list = good to go) so that a bad graph
fails on the workstation, in seconds, instead of on a Jetson after a ten-minute engine build:

* no control flow (``If`` / ``Loop`` / ``Scan``): TensorRT builds them as conditional / loop
  layers that block fusion, and in an edge_ad detector they mean a data-dependent Python branch
  was traced (the method contract forbids those);
* static shapes: inputs fully static, and every intermediate shape fixed at build time (no shape
  computed from tensor values; dynamic shapes need optimisation profiles and cost fusion);
* only ops TensorRT 10's ONNX parser implements (:data:`TENSORRT10_ONNX_OPS`), default domain;
* explicit quantization done the TensorRT way: INT8 only, zero points 0, positive finite constant
  scales, per-channel scales only on weights and on their output-channel axis, and no Q/DQ in
  front of ops of the float recipe (residual ``Add``, LayerNorm, Softmax, ...; reported by name);
* ``TopK`` with a constant K <= 3840 (TensorRT's limit).

:func:`qdq_summary` describes where a graph is quantised (used by tests and by
:mod:`edge_ad.converters.qdq` for its report).
"""
from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CONTROL_FLOW_OPS",
    "FLOAT_ONLY_OP_TYPES",
    "QDQSummary",
    "TENSORRT10_ONNX_OPS",
    "TOPK_MAX_K",
    "WeightQuant",
    "check_tensorrt_compatible",
    "qdq_summary",
]

#: Default-domain ONNX ops TensorRT 10's ONNX parser (onnx-tensorrt 10.x) implements, among those
#: that vision backbones, detector heads and their exports use. Anything else is reported.
TENSORRT10_ONNX_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
    Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
    Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish
    Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear RandomNormal
    RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2
    ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze STFT Sub Sum Tan Tanh ThresholdedRelu Tile TopK
    Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

#: Control flow: parseable by TensorRT, but never allowed in an edge_ad engine (see module doc).
CONTROL_FLOW_OPS: frozenset[str] = frozenset({"If", "Loop", "Scan"})

#: Quantised-operator ("QOperator") format: TensorRT wants Q/DQ around float ops instead.
_QOPERATOR_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "MatMulInteger", "ConvInteger",
     "DynamicQuantizeLinear", "QLinearSigmoid", "QLinearGlobalAveragePool", "QLinearConcat"}
)

#: Ops the edge_ad INT8 recipe keeps float: no Q/DQ may feed them (INT8 residual Adds collapse
#: ViT accuracy; normalisation and softmax are precision-sensitive and cheap).
FLOAT_ONLY_OP_TYPES: frozenset[str] = frozenset(
    {"Add", "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
     "Softmax", "LogSoftmax", "TopK"}
)

#: TensorRT's largest K for TopK (ITopKLayer).
TOPK_MAX_K = 3840

# Ops TensorRT moves Q/DQ across (data movement only): a DQ before them still quantises what follows.
_TRANSPARENT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather",
     "Split", "Concat", "Expand", "Tile", "MaxPool"}
)
_WEIGHT_OPS = ("MatMul", "Conv", "Gemm", "ConvTranspose")
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_MAX_LISTED = 6


@dataclass(frozen=True)
class WeightQuant:
    """How one node's constant weight is quantised.

    Attributes:
        dtype: integer type of the stored weight (``"INT8"``, ``"UINT8"``, ...).
        axis: quantisation axis of a per-channel scale (normalised to >= 0), None if per tensor.
        num_scales: number of scales (output channels when per channel, 1 otherwise).
        symmetric: every zero point is 0.
    """

    dtype: str
    axis: int | None
    num_scales: int
    symmetric: bool


@dataclass
class QDQSummary:
    """Where a graph carries Q/DQ.

    Attributes:
        quantized_weight_nodes: weight-bearing node name -> :class:`WeightQuant` of its weight.
        quantized_activation_nodes: node name -> indices of its inputs that come from an
            activation ``DequantizeLinear`` (directly or through data-movement ops).
        quantized_float_ops: nodes of :data:`FLOAT_ONLY_OP_TYPES` with a Q/DQ'd input, by op type.
        num_quantize, num_dequantize: counts of ``QuantizeLinear`` / ``DequantizeLinear`` nodes.
    """

    quantized_weight_nodes: dict[str, WeightQuant] = field(default_factory=dict)
    quantized_activation_nodes: dict[str, list[int]] = field(default_factory=dict)
    quantized_float_ops: dict[str, list[str]] = field(default_factory=dict)
    num_quantize: int = 0
    num_dequantize: int = 0

    @property
    def quantized_adds(self) -> list[str]:
        """``Add`` nodes with an INT8 input (the recipe wants none)."""
        return list(self.quantized_float_ops.get("Add", []))

    @property
    def is_quantized(self) -> bool:
        return self.num_quantize + self.num_dequantize > 0


# ---------------------------------------------------------------------------- helpers
def _load(model_or_path: Any) -> Any:
    import onnx

    if isinstance(model_or_path, (str, Path)):
        return onnx.load(str(model_or_path))
    if isinstance(model_or_path, (bytes, bytearray)):
        return onnx.load_from_string(bytes(model_or_path))
    return model_or_path


def constant_values(model: Any) -> dict[str, np.ndarray]:
    """Tensor name -> value of every initializer and ``Constant`` node output (``value`` attribute)."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(a.t)
    return values


def _constant_dtypes(model: Any) -> dict[str, int]:
    dtypes = {t.name: int(t.data_type) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    dtypes[node.output[0]] = int(a.t.data_type)
    return dtypes


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type)


def _all_nodes(graph: Any) -> Iterable[Any]:
    """Every node, including those in subgraphs (If branches, Loop bodies)."""
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.g is not None and a.g.node:
                yield from _all_nodes(a.g)
            for g in a.graphs:
                yield from _all_nodes(g)


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _dims(value_info: Any) -> list[int | str | None] | None:
    """Static dims as ints, symbolic as their name, unknown as None; None when there is no shape."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


# ---------------------------------------------------------------------------- Q/DQ analysis
def qdq_summary(model_or_path: Any) -> QDQSummary:
    """Where ``model`` (path, bytes or ``ModelProto``) carries Q/DQ; see :class:`QDQSummary`."""
    from onnx import TensorProto

    model = _load(model_or_path)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    constants = constant_values(model)
    cdtypes = _constant_dtypes(model)
    summary = QDQSummary(
        num_quantize=sum(n.op_type == "QuantizeLinear" for n in graph.node),
        num_dequantize=sum(n.op_type == "DequantizeLinear" for n in graph.node),
    )

    def weight_dq(dq: Any) -> bool:
        """A DequantizeLinear of a constant: INT8 initializer -> DQ, or float initializer -> Q -> DQ."""
        src = dq.input[0]
        q = producer.get(src)
        return src in constants or (q is not None and q.op_type == "QuantizeLinear" and q.input[0] in constants)

    def activation_dq(name: str, depth: int = 0) -> bool:
        """``name`` is (a data-movement view of) an activation DequantizeLinear output."""
        node = producer.get(name)
        if node is None or depth > 8:
            return False
        if node.op_type == "DequantizeLinear":
            return not weight_dq(node)
        if node.op_type in _TRANSPARENT_OPS:
            return any(activation_dq(i, depth + 1) for i in node.input[:1])
        return False

    for node in graph.node:
        if node.op_type in _QDQ:
            continue
        act = [i for i, name in enumerate(node.input) if name and activation_dq(name)]
        if act:
            summary.quantized_activation_nodes[node.name] = act
            if node.op_type in FLOAT_ONLY_OP_TYPES:
                summary.quantized_float_ops.setdefault(node.op_type, []).append(node.name)
        if node.op_type in _WEIGHT_OPS and len(node.input) > 1:
            dq = producer.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if not weight_dq(dq):
                continue
            src = dq.input[0]
            if src in constants:  # INT8 initializer -> DQ (how onnxruntime and ModelOpt store weights)
                weight_name = src
                dtype = _type_name(cdtypes.get(src, TensorProto.UNDEFINED))
                scale_name = dq.input[1]
                zp_name = dq.input[2] if len(dq.input) > 2 else ""
            else:  # float initializer -> Q -> DQ: the stored type is the Q's output type
                q = producer[src]
                weight_name = q.input[0]
                zp_name = q.input[2] if len(q.input) > 2 else ""
                dtype = _type_name(cdtypes[zp_name]) if zp_name in cdtypes else "UINT8"
                scale_name = q.input[1]
            scale = np.atleast_1d(constants.get(scale_name, np.ones(1)))
            zp = constants.get(zp_name)
            rank = constants[weight_name].ndim
            axis = None
            if scale.size > 1:
                axis = int(_attr(dq, "axis", 1))
                axis = axis + rank if axis < 0 else axis
            summary.quantized_weight_nodes[node.name] = WeightQuant(
                dtype=dtype, axis=axis, num_scales=int(scale.size),
                symmetric=zp is None or not np.any(zp),
            )
    return summary


def _expected_weight_axis(node: Any, rank: int) -> int | None:
    """Output-channel axis TensorRT needs for a per-channel weight of ``node`` (rank ``rank``)."""
    if node.op_type == "Conv":
        return 0  # (O, I / g, kh, kw)
    if node.op_type == "ConvTranspose":
        return 1  # (I, O / g, kh, kw)
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul":
        return rank - 1  # (K, N): N output channels
    return None


def _check_qdq(model: Any, float_op_types: Collection[str]) -> list[str]:
    from onnx import TensorProto

    problems: list[str] = []
    graph = model.graph
    constants = constant_values(model)
    cdtypes = _constant_dtypes(model)
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    for node in graph.node:
        if node.op_type not in _QDQ:
            continue
        what = f"{node.op_type} {node.name!r}"
        if _attr(node, "block_size", 0):
            problems.append(f"{what}: block quantisation (block_size) is not part of the INT8 recipe")
        # Scale: a build-time constant, positive, finite.
        scale = constants.get(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            problems.append(f"{what}: scale {node.input[1] if len(node.input) > 1 else ''!r} is not a constant; "
                            "TensorRT needs build-time scales")
            continue
        scale = np.asarray(scale, dtype=np.float64)
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{what}: scales must be positive and finite (min {scale.min():.3g})")
        # Zero point: constant INT8 zeros (an absent zero point makes QuantizeLinear emit UINT8).
        zp_name = node.input[2] if len(node.input) > 2 else ""
        if zp_name:
            zp = constants.get(zp_name)
            if zp is None:
                problems.append(f"{what}: zero point {zp_name!r} is not a constant")
            else:
                if cdtypes.get(zp_name) != TensorProto.INT8:
                    problems.append(
                        f"{what}: {_type_name(cdtypes.get(zp_name, 0))} quantisation; TensorRT's INT8 recipe needs INT8"
                    )
                if np.any(zp):
                    problems.append(f"{what}: zero point must be 0 (TensorRT is symmetric only), got non-zero values")
        elif node.op_type == "QuantizeLinear":
            problems.append(f"{what}: no zero point, so ONNX quantises to UINT8; give an INT8 zero point of 0")
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            dt = cdtypes.get(node.input[0])
            if dt != TensorProto.INT8:
                problems.append(f"{what}: weight stored as {_type_name(dt or 0)}; TensorRT's INT8 recipe needs INT8")
        # Per-channel scales: weights only, on the output-channel axis, one scale per channel.
        if scale.size > 1:
            is_weight = node.op_type == "DequantizeLinear" and node.input[0] in constants
            is_weight = is_weight or (node.op_type == "QuantizeLinear" and node.input[0] in constants)
            if not is_weight:
                problems.append(f"{what}: per-channel scales on an activation; TensorRT quantises activations per tensor")
                continue
            weight = constants[node.input[0]]
            axis = int(_attr(node, "axis", 1))
            axis = axis + weight.ndim if axis < 0 else axis
            if not 0 <= axis < weight.ndim:
                problems.append(f"{what}: axis {axis} out of range for a rank-{weight.ndim} weight")
                continue
            if weight.shape[axis] != scale.size:
                problems.append(
                    f"{what}: {scale.size} scales for {weight.shape[axis]} channels on axis {axis}"
                )
            out = node.output[0]
            users = list(consumers.get(out, []))
            if node.op_type == "QuantizeLinear":  # Q -> DQ -> op: look at the DQ's users
                users = [u for dq in users for u in consumers.get(dq.output[0], [])]
            for user in users:
                expected = _expected_weight_axis(user, weight.ndim)
                if expected is not None and user.input[1:2] and axis != expected:
                    problems.append(
                        f"{what}: per-channel axis {axis} but {user.op_type} {user.name!r} needs its output-channel axis "
                        f"{expected}"
                    )

    summary = qdq_summary(model)
    for op_type in sorted(summary.quantized_float_ops):
        if op_type in float_op_types:
            names = summary.quantized_float_ops[op_type]
            why = "the residual stream must stay float" if op_type == "Add" else "it must stay float"
            problems.append(f"{len(names)} {op_type} node(s) have INT8 (Q/DQ) inputs, {why}: {_listed(names)}")
    return problems


# Shape-determining inputs (op type -> input indices): if their *values* depend on the image, the
# tensor shapes downstream are only known at run time.
_SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Pad": (1, 3), "Resize": (2, 3), "Upsample": (1,),
    "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,), "Range": (0, 1, 2), "TopK": (1,), "Squeeze": (1,),
    "Unsqueeze": (1,), "Split": (1,), "OneHot": (1,), "ReduceMean": (1,), "ReduceSum": (1,),
    "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,),
    "ReduceSumSquare": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,),
}
# Ops whose output shape depends on input values by definition.
_DATA_SHAPED_OPS = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})


def _data_dependent_shapes(graph: Any, init_names: set[str]) -> list[str]:
    """Intermediate shapes that TensorRT cannot fix at build time although the input is static.

    With static inputs, every shape is a build-time constant unless a shape-determining input
    (``Reshape``'s shape, ``Pad``'s pads, ``TopK``'s K, ...) is computed from tensor *values*, or
    an op's output size is data-dependent (``NonZero``). ``Shape`` / ``Size`` outputs depend on
    shapes only, so shapes computed from them (e.g. TF "same" padding) are fine: TensorRT folds
    them while building. This is stricter and more precise than ONNX shape inference, which gives
    up on such shape arithmetic.
    """
    data = {i.name for i in graph.input if i.name not in init_names}
    problems: list[str] = []
    for node in graph.node:  # ONNX nodes are topologically sorted
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            continue  # static shapes in, constants out
        if node.op_type in _DATA_SHAPED_OPS and any(i in data for i in ins):
            problems.append(f"{node.op_type} {node.name!r}: output size depends on tensor values (data-dependent shape)")
        for idx in _SHAPE_INPUTS.get(node.op_type, ()):
            if idx < len(node.input) and node.input[idx] in data:
                problems.append(
                    f"{node.op_type} {node.name!r}: input {idx} ({node.input[idx]!r}) is computed from tensor values, "
                    "so the shape is only known at run time; derive it from constants or Shape"
                )
        if any(i in data for i in ins):
            data.update(o for o in node.output if o)
    return problems

# ---------------------------------------------------------------------------- entry point
def check_tensorrt_compatible(
    onnx_path: str | Path | bytes | Any,
    *,
    float_op_types: Collection[str] = FLOAT_ONLY_OP_TYPES,
    check_intermediate_shapes: bool = True,
) -> list[str]:
    """Problems that stop (or degrade) a TensorRT 10 build of this ONNX; empty = compatible.

    Args:
        onnx_path: path, serialized bytes or ``onnx.ModelProto``.
        float_op_types: op types that must not have INT8 (Q/DQ) inputs (the edge_ad recipe:
            residual ``Add``, normalisations, Softmax, TopK); pass ``()`` to allow Q/DQ anywhere.
        check_intermediate_shapes: also require every intermediate shape to be fixed at build time
            (no shape-determining input computed from tensor values, no ``NonZero``-like ops on them).
            Declared output dims are not judged: ``torch.onnx.export`` writes symbolic names on
            outputs of static graphs, and TensorRT derives output shapes from the inputs.

    Returns:
        One human-readable sentence per problem, naming the node / tensor.
    """
    import onnx

    model = _load(onnx_path)
    graph = model.graph
    problems: list[str] = []
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - any checker failure is a problem to report
        problems.append(f"invalid ONNX: {str(exc).splitlines()[0]}")

    # Ops: control flow, custom domains, QOperator format, unsupported ops.
    by_issue: dict[str, list[str]] = {}
    for node in _all_nodes(graph):
        label = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx"):
            by_issue.setdefault(f"custom-domain op {node.domain}::{node.op_type}", []).append(label)
        elif node.op_type in CONTROL_FLOW_OPS:
            by_issue.setdefault(f"control flow {node.op_type}", []).append(label)
        elif node.op_type in _QOPERATOR_OPS:
            by_issue.setdefault(f"QOperator-format op {node.op_type}", []).append(label)
        elif node.op_type not in TENSORRT10_ONNX_OPS:
            by_issue.setdefault(f"op {node.op_type}", []).append(label)
    for issue, names in by_issue.items():
        if issue.startswith("control flow"):
            why = ("edge_ad engines have no data-dependent branches or loops (the method contract); "
                   "export the detector without Python control flow on tensor values")
        elif issue.startswith("custom-domain"):
            why = "TensorRT's ONNX parser has no such op (it needs a plugin); export with standard ONNX ops only"
        elif issue.startswith("QOperator"):
            why = "TensorRT takes explicit quantization as QuantizeLinear/DequantizeLinear pairs (QuantFormat.QDQ)"
        else:
            why = "not in TensorRT 10's ONNX parser op list; rewrite the layer or add a plugin"
        problems.append(f"{issue} in {_listed(names)}: {why}")

    # Static shapes: inputs and outputs.
    init_names = {t.name for t in graph.initializer}
    for v in (v for v in graph.input if v.name not in init_names):
        dims = _dims(v)
        if dims is None:
            problems.append(f"graph input {v.name!r} has no shape; export with a fixed input size")
        elif any(not isinstance(d, int) for d in dims):
            shown = ["?" if d is None else d for d in dims]
            problems.append(
                f"graph input {v.name!r} has dynamic shape {shown}; edge_ad engines are built for one static "
                "shape (export with a fixed batch and size, no dynamic_axes)"
            )
    if check_intermediate_shapes:
        problems.extend(_data_dependent_shapes(graph, init_names))

    # Data types TensorRT cannot run.
    f64 = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    f64 += [v.name for v in list(graph.input) + list(graph.output) if v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]
    if f64:
        problems.append(f"DOUBLE (float64) tensors {_listed(f64)}: TensorRT has no FP64; export in float32")

    # TopK: constant K within TensorRT's limit.
    constants = constant_values(model)
    for node in graph.node:
        if node.op_type != "TopK":
            continue
        k = constants.get(node.input[1]) if len(node.input) > 1 else np.asarray(_attr(node, "k", 0))
        if k is None:
            problems.append(f"TopK {node.name!r}: K is not a constant; TensorRT needs a build-time K")
        elif int(np.asarray(k).reshape(-1)[0]) > TOPK_MAX_K:
            problems.append(f"TopK {node.name!r}: K = {int(np.asarray(k).reshape(-1)[0])} exceeds TensorRT's limit of "
                            f"{TOPK_MAX_K}")

    # Explicit quantization.
    if any(n.op_type in _QDQ for n in graph.node):
        problems.extend(_check_qdq(model, float_op_types))
    return problems
