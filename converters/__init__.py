"""edge_ad.converters: export, fidelity, quantisation and distillation of trained detectors.

Export and fidelity (importing this package does not import torch; :func:`export_onnx` does)::

    export_onnx(detector, path, batch_size=1, opset=17, validate_images=None) -> Path
    read_onnx_metadata(path) -> dict;  check_onnx_graph(path);  validate_onnx(path, detector, images)
    fidelity_report(reference, candidate, data, ...) -> FidelityReport (.to_dict/.table/.save)
    onnxruntime_runner(path, providers=("CPUExecutionProvider",)) -> runner;  torch_runner(module)

Distillation (teacher run -> small ``student`` run; see :mod:`edge_ad.converters.distill`)::

    distill(run_dir, student, data, category, out, image_size=None, steps=None, ...) -> Path

A runner is any callable ``images float32 (B, 3, H, W) -> (maps (B, 1, H, W), scores (B,))``.
"""
from __future__ import annotations

from .export import (
    ExportValidation,
    OnnxValidationError,
    UnsupportedGraphError,
    check_onnx_graph,
    export_onnx,
    find_control_flow,
    read_onnx_metadata,
    validate_onnx,
)
from .distill import distill, distillation_fidelity
from .fidelity import FidelityReport, OnnxRuntimeRunner, Runner, fidelity_report, onnxruntime_runner, torch_runner

__all__ = [
    "ExportValidation",
    "FidelityReport",
    "OnnxRuntimeRunner",
    "OnnxValidationError",
    "Runner",
    "UnsupportedGraphError",
    "check_onnx_graph",
    "distill",
    "distillation_fidelity",
    "export_onnx",
    "fidelity_report",
    "find_control_flow",
    "onnxruntime_runner",
    "read_onnx_metadata",
    "torch_runner",
    "validate_onnx",
]
