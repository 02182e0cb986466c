"""Give a static-shape ONNX model (FP32, FP16 or INT8 Q/DQ) a different fixed batch.

Used by ``edge-ad convert --batch N`` for onnxruntime and TensorRT targets: conversion, Q/DQ
calibration and fidelity run on the batch-1 graph; the final ONNX is then re-batched here. Only
the batch dimension of the input and outputs changes: weights and quantisation scales are the same
numbers. edge_ad exports compute their reshape targets from ``Shape`` or use ``-1``, so the graph
follows the input's batch; a graph that bakes batch 1 into a constant is caught by strict shape
inference here, or by the caller's frame-by-frame comparison with the batch-1 model.
"""
from __future__ import annotations

from pathlib import Path


def rebatch_onnx(onnx_path: str | Path, batch: int, out_path: str | Path | None = None) -> Path:
    """Copy ``onnx_path`` with its input's and outputs' dim 0 fixed to ``batch``.

    Args:
        onnx_path: a static-shape model with one image input ``(1, 3, H, W)``.
        batch: the new static batch N >= 1.
        out_path: where to write; default ``<stem>_b<N>.onnx`` beside the original, so weights
            stored as external data (relative locations) stay valid.

    Returns:
        The written path.

    Raises:
        ValueError: bad ``batch``, or a graph whose shapes do not follow its input batch.
    """
    import onnx

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    onnx_path = Path(onnx_path)
    out = Path(out_path) if out_path is not None else onnx_path.with_name(f"{onnx_path.stem}_b{batch}.onnx")
    model = onnx.load(str(onnx_path), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4:
        raise ValueError(f"{onnx_path}: expected one (B, 3, H, W) image input, found {[i.name for i in inputs]}")
    for value in (inputs[0], *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch
    # The stored intermediate shapes say batch 1: drop them and let strict inference recompute them,
    # so a constant that still says 1 conflicts here instead of producing wrong maps later.
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"cannot give {onnx_path} a static batch of {batch}: {exc}; this model bakes its batch "
                         "into its graph, convert with --batch 1") from exc
    del inferred.graph.value_info[:]  # keep the file as lean as the original (runtimes infer their own)
    onnx.save(inferred, str(out))
    return out
