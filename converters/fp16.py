"""FP16 ONNX with FP32 islands: what a strongly typed TensorRT (>= 11) network builds FP16 from.

TensorRT 11 removed weak typing (``BuilderFlag.FP16``, ``layer.precision``,
``OBEY_PRECISION_CONSTRAINTS``): a network's tensor types come from the ONNX itself. So an FP16
engine is built from an ONNX converted to FP16 in which the layers the FP32 rules keep
(:func:`edge_ad.converters.tensorrt.select_fp32_layers`: normalisations, Softmax, residual adds,
the detector's score head, per :data:`~edge_ad.converters.tensorrt.FP32_PRESETS`) stay FP32 behind
``Cast`` nodes. Inputs and outputs stay FP32 (the bundle's I/O contract). The converter's default
op block list (ops onnxruntime has no FP16 kernel for: ``TopK``, ``Min``, ``Max``, ``Range``...)
stays FP32 too, so the same FP16 ONNX runs in onnxruntime for the fidelity check.

Converter: ``onnxruntime.transformers.float16.convert_float_to_float16``, chosen because

* it ships with onnxruntime, which the ``convert`` extra (and the fidelity check) already needs:
  no new dependency, torch-free, runs on a Jetson next to ``edge-ad build-engine``;
* it takes a per-node block list (``node_block_list``) and inserts the FP32<->FP16 casts around
  blocked nodes, which is exactly "FP16 graph with named FP32 islands";
* ``onnxconverter-common``'s ``float16`` is the same algorithm (onnxruntime's copy is a maintained
  fork) but one more package; ModelOpt's AutoCast picks the islands itself from a data-driven
  range analysis and needs ``nvidia-modelopt`` (torch, CUDA wheels): we want *our* documented,
  presettable islands (``--fp32-layers``) and no torch on the device.

Torch-free; needs ``onnx`` and ``onnxruntime`` (``pip install edge-ad[convert]``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Fp16Conversion", "FP16_CONVERTER_MISSING", "convert_fp16", "fp16_fidelity", "island_dtypes", "onnx_layers"]

FP16_CONVERTER_MISSING = (
    "building an FP16 engine on TensorRT >= 11 (strongly typed networks) converts the ONNX to FP16 first, which "
    "needs onnx and onnxruntime: `pip install onnx onnxruntime` (or edge-ad[convert]); or build precision='fp32'"
)

#: ONNX op -> the TensorRT layer type its parser makes (the main layer of the node).
_LAYER_TYPES: dict[str, str] = {
    "LayerNormalization": "NORMALIZATION", "GroupNormalization": "NORMALIZATION",
    "InstanceNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "LogSoftmax": "SOFTMAX",
    "MatMul": "MATRIX_MULTIPLY", "Gemm": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION",
    "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE", "Constant": "CONSTANT",
    "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "Flatten": "SHUFFLE", "Squeeze": "SHUFFLE",
    "Unsqueeze": "SHUFFLE", "Shape": "SHAPE", "Gather": "GATHER", "Slice": "SLICE", "Split": "SLICE",
    "Expand": "SLICE", "Concat": "CONCATENATION", "Cast": "CAST", "Identity": "IDENTITY", "TopK": "TOPK",
    "Resize": "RESIZE", "Pad": "PADDING", "ConstantOfShape": "FILL",
}
_ELEMENTWISE: dict[str, str] = {"Add": "SUM", "Sub": "SUB", "Mul": "PROD", "Div": "DIV", "Pow": "POW",
                                "Max": "MAX", "Min": "MIN", "Equal": "EQUAL"}
_PASS_THROUGH = ("Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze")
_FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


@dataclass
class Fp16Conversion:
    """Result of :func:`convert_fp16`.

    Attributes:
        path: the FP16 ONNX written.
        fp32_nodes: ``{node name: reason}`` kept FP32 (the islands).
        casts: Cast nodes the converter inserted around the islands and the FP32 I/O.
    """

    path: Path
    fp32_nodes: dict[str, str] = field(default_factory=dict)
    casts: int = 0


def _elem_types(model: Any) -> dict[str, int]:
    """ONNX element type of every tensor (shape inference; initializers and graph I/O included)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - models > 2 GB or unknown ops: fall back to what the graph declares
        inferred = model
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def onnx_layers(model: Any) -> list[Any]:
    """:class:`~edge_ad.converters.tensorrt.LayerDesc` of every node of an ONNX model, as TensorRT's
    parser would name and type its main layer (node name, layer type, element-wise op, constant
    inputs, whether every input and output is floating point)."""
    from .tensorrt import LayerDesc

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    constants = {t.name for t in g.initializer}
    types = _elem_types(model)

    def constant(name: str, depth: int = 0) -> bool:
        if name in constants:
            return True
        node = producer.get(name)
        if node is None or depth > 4:
            return False
        if node.op_type == "Constant":
            return True
        return node.op_type in _PASS_THROUGH and bool(node.input) and constant(node.input[0], depth + 1)

    descs = []
    for node in g.node:
        op = _ELEMENTWISE.get(node.op_type)
        kind = "ELEMENTWISE" if op else _LAYER_TYPES.get(node.op_type, node.op_type.upper())
        # Computes on floats: every non-constant input and the first output (a TopK's indices do not count).
        tensors = [t for t in node.input if t and not constant(t)] + list(node.output[:1])
        float_io = all(types.get(t, 1) in _FLOAT_TYPES for t in tensors)
        n_const = sum(constant(t) for t in node.input if t) if op else 0
        descs.append(LayerDesc(node.name, kind, op, n_const, float_io))
    return descs


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    *,
    fp32_layers: str = "default",
    patterns: Sequence[tuple[str, str]] | None = None,
) -> Fp16Conversion:
    """Convert an FP32 ONNX to FP16, keeping the FP32 islands of preset ``fp32_layers`` in FP32.

    Args:
        src: FP32 ONNX (static shapes; external data next to it is read).
        dst: FP16 ONNX to write.
        fp32_layers: one of :data:`~edge_ad.converters.tensorrt.FP32_PRESETS`.
        patterns: layer-name patterns (default :data:`~edge_ad.converters.tensorrt.DEFAULT_FP32_PATTERNS`).

    Raises:
        ImportError: onnx / onnxruntime missing (:data:`FP16_CONVERTER_MISSING`).
        ValueError: the model is not FP32 (already FP16, or has Q/DQ: build those as they are).
    """
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise ImportError(FP16_CONVERTER_MISSING) from exc
    from .tensorrt import DEFAULT_FP32_PATTERNS, select_fp32_layers

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    ops = {n.op_type for n in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear"}:
        raise ValueError(f"{src} carries Q/DQ (explicit INT8) nodes: build it as INT8, not through the FP16 converter")
    inputs = [vi.type.tensor_type.elem_type for vi in model.graph.input]
    if 10 in inputs or any(t.data_type == 10 for t in model.graph.initializer):
        raise ValueError(f"{src} already has FP16 tensors: build it as it is")
    # Unnamed nodes cannot be blocked by name; name them the way TensorRT's parser reports them.
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    chosen = select_fp32_layers(onnx_layers(model), patterns=DEFAULT_FP32_PATTERNS if patterns is None else patterns,
                                preset=fp32_layers)
    before = sum(n.op_type == "Cast" for n in model.graph.node)
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=list(chosen))
    casts = sum(n.op_type == "Cast" for n in converted.graph.node) - before
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(dst))
    return Fp16Conversion(dst, dict(chosen), casts)


def island_dtypes(model: Any, nodes: Mapping[str, str] | Sequence[str]) -> dict[str, set[int]]:
    """Element types of the float inputs / outputs of the named nodes (a check that islands stayed FP32)."""
    types = _elem_types(model)
    wanted = set(nodes)
    out: dict[str, set[int]] = {}
    for node in model.graph.node:
        if node.name in wanted:
            out[node.name] = {types[t] for t in (*node.input, *node.output) if t in types and types[t] in (1, 10)}
    return out


def fp16_fidelity(
    fp32_onnx: str | Path,
    data: Any,
    spec: Any,
    out_dir: str | Path,
    *,
    presets: Sequence[str] = ("default", "no-softmax", "none"),
) -> list[tuple[str, Fp16Conversion, Any]]:
    """Convert ``fp32_onnx`` with each preset and compare FP16 with FP32 in onnxruntime (CPU).

    What an FP16 engine on TensorRT >= 11 is built from, checked the way INT8 conversions are
    (:func:`edge_ad.converters.fidelity.fidelity_report`, reference = the FP32 ONNX). It checks
    the ONNX conversion, not TensorRT's FP16 kernels.

    Args:
        fp32_onnx: the bundle's FP32 ONNX.
        data: validation set (e.g. ``MVTecDataset(root, category, "test")``).
        spec: the bundle's :class:`~edge_ad.runtime.PreprocessSpec`.
        out_dir: where the FP16 ONNX files are written (``fp16_<preset>.onnx``).
        presets: FP32-island presets to compare.

    Returns:
        ``[(preset, Fp16Conversion, FidelityReport)]``.
    """
    from .fidelity import fidelity_report, onnxruntime_runner

    reference = onnxruntime_runner(fp32_onnx)
    results = []
    for preset in presets:
        conv = convert_fp16(fp32_onnx, Path(out_dir) / f"fp16_{preset}.onnx", fp32_layers=preset)
        report = fidelity_report(reference, onnxruntime_runner(conv.path), data, spec=spec,
                                 reference_name="onnx-fp32", format="onnx", precision=f"fp16/{preset}")
        results.append((preset, conv, report))
    return results
