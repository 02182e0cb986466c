"""Runtime inference engines: one module per bundle ``engine.name``, all torch-free.

An engine owns the compiled model and a preallocated input buffer that preprocessing writes into
directly (no copy between preprocessing and inference). Engines are not thread-safe on their own;
:class:`edge_ad.runtime.Detector` serialises access with one lock.

``engine.name`` -> engine:

* ``onnxruntime``: :class:`OnnxRuntimeEngine` (needs the ``onnxruntime`` package);
* ``openvino``: :class:`OpenVINOEngine` (needs ``openvino``), with the bundle's pinned
  ``INFERENCE_PRECISION_HINT``;
* ``tensorrt``: not written yet; :func:`create_engine` raises ``NotImplementedError``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle

__all__ = ["Engine", "create_engine"]


class Engine(Protocol):
    """What :class:`~edge_ad.runtime.Detector` needs from an engine."""

    name: str
    device: str
    #: Static batch of the model, or None when the batch dimension is dynamic.
    batch: int | None

    def input_buffer(self, n: int) -> np.ndarray:
        """A C-contiguous (B, 3, H, W) buffer with B >= n (B == ``batch`` when static) to preprocess into."""

    def run(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Infer on the first ``n`` frames of the buffer; return copies ``(maps (n, h, w) float32, scores (n,))``."""


def _output_indices(bundle: "Bundle", names: list[str]) -> tuple[int, int]:
    """Indices of the anomaly map and score outputs among the engine's ``names`` (manifest order else)."""
    wanted = [o.name for o in bundle.manifest.outputs]
    if len(wanted) >= 2 and wanted[0] in names and wanted[1] in names:
        return names.index(wanted[0]), names.index(wanted[1])
    if len(names) < 2:
        raise RuntimeError(f"the model has outputs {names}; expected (anomaly_map, score)")
    return 0, 1


def create_engine(bundle: "Bundle", device: str = "auto") -> Engine:
    """Build the engine the bundle was made for (``manifest.engine.name``)."""
    name = bundle.manifest.engine.name
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, device)
    if name == "openvino":
        from .openvino_engine import OpenVINOEngine

        return OpenVINOEngine(bundle, device)
    if name == "tensorrt":
        raise NotImplementedError(
            f"bundle {bundle.source} targets {bundle.manifest.target!r} (engine 'tensorrt'): the TensorRT runtime "
            "engine of edge_ad.runtime.Detector is not written yet. On the device, `edge-ad build-engine <bundle>` "
            "builds the TensorRT engine from the bundle's model.onnx; for now run that engine with TensorRT directly, "
            "or convert for an 'onnx-cpu' / OpenVINO target to use Detector."
        )
    raise NotImplementedError(f"bundle {bundle.source} names engine {name!r}, which this edge_ad runtime has no engine for")
