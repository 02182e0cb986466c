"""OpenVINO engine: the bundle's IR compiled with its pinned ``INFERENCE_PRECISION_HINT``.

Preprocessing writes straight into the infer request's own input tensor (``tensor.data``), so no
copy happens between preprocessing and inference.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import _output_indices

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle


def _import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(
            f"this bundle runs on OpenVINO, but the openvino package cannot be imported ({exc}). "
            "Install it with `pip install openvino`."
        ) from exc
    return openvino


class OpenVINOEngine:
    """``openvino/model.xml`` compiled for ``device`` ("auto" = the bundle target's device)."""

    name = "openvino"

    def __init__(self, bundle: "Bundle", device: str = "auto") -> None:
        ov = _import_openvino()
        self.device = bundle.target.device if device == "auto" else str(device)
        config = dict(bundle.manifest.engine.hints)  # INFERENCE_PRECISION_HINT is always pinned in the bundle
        self.config = config
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(bundle.path("openvino/model.xml"))), self.device, config)
        shape = self.compiled.inputs[0].get_partial_shape()
        self.batch = int(shape[0].get_length()) if shape[0].is_static else None
        self._hw = (bundle.manifest.input.height, bundle.manifest.input.width)
        self.request = self.compiled.create_infer_request()
        names = [next(iter(o.get_names()), str(i)) for i, o in enumerate(self.compiled.outputs)]
        self._map_idx, self._score_idx = _output_indices(bundle, names)
        self._dtype = np.float16 if self.compiled.inputs[0].get_element_type() == ov.Type.f16 else np.float32
        self._ov = ov
        self._n = 0
        self._set_input(self.batch or 1)

    def _set_input(self, n: int) -> None:
        tensor = self._ov.Tensor(np.zeros((n, 3, *self._hw), self._dtype))
        self.request.set_input_tensor(tensor)
        self._buffer = self.request.get_input_tensor().data  # a view of the tensor's memory
        self._n = n

    def input_buffer(self, n: int) -> np.ndarray:
        if self.batch is None and n != self._n:
            self._set_input(n)
        return self._buffer

    def run(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        self.request.infer()
        maps = np.asarray(self.request.get_output_tensor(self._map_idx).data, np.float32)
        scores = np.asarray(self.request.get_output_tensor(self._score_idx).data, np.float32)
        b = maps.shape[0]
        maps = maps.reshape(b, maps.shape[-2], maps.shape[-1])[:n].copy()
        return maps, scores.reshape(b, -1)[:n, 0].copy()
