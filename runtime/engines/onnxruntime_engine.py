"""onnxruntime engine (CPU execution provider; CUDA when asked for and available)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import _output_indices

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle

_PROVIDERS = {"CPU": "CPUExecutionProvider", "GPU": "CUDAExecutionProvider", "CUDA": "CUDAExecutionProvider"}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            f"this bundle runs on onnxruntime, but the onnxruntime package cannot be imported ({exc}). Install it "
            "with `pip install onnxruntime` (x86 / ARM CPU) or `pip install onnxruntime-gpu` (NVIDIA)."
        ) from exc
    return onnxruntime


class OnnxRuntimeEngine:
    """``model.onnx`` in an onnxruntime session; the numpy input buffer is handed to ``run`` as is."""

    name = "onnxruntime"

    def __init__(self, bundle: "Bundle", device: str = "auto") -> None:
        ort = _import_onnxruntime()
        device = bundle.target.device if device == "auto" else str(device)
        provider = _PROVIDERS.get(device.upper())
        if provider is None:
            raise ValueError(f"device {device!r} is not one onnxruntime can use here; pass one of {sorted(_PROVIDERS)} "
                             "or 'auto'")
        available = ort.get_available_providers()
        if provider not in available:
            raise ValueError(f"device {device!r} needs onnxruntime's {provider}, which this onnxruntime build lacks "
                             f"(available: {', '.join(available)})")
        self.device = device.upper()
        self.session = ort.InferenceSession(str(bundle.path("model.onnx")), providers=[provider])
        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        dim0 = inp.shape[0]
        self.batch = int(dim0) if isinstance(dim0, int) else None
        self._dtype = np.float16 if "float16" in inp.type else np.float32
        self._hw = (bundle.manifest.input.height, bundle.manifest.input.width)
        names = [o.name for o in self.session.get_outputs()]
        self._map_idx, self._score_idx = _output_indices(bundle, names)
        self._buffer = np.zeros((self.batch or 1, 3, *self._hw), self._dtype)

    def input_buffer(self, n: int) -> np.ndarray:
        if self.batch is None and len(self._buffer) < n:
            self._buffer = np.zeros((n, 3, *self._hw), self._dtype)
        return self._buffer

    def run(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = self._buffer if self.batch is not None else self._buffer[:n]
        outs = self.session.run(None, {self._input_name: x})
        maps = np.asarray(outs[self._map_idx], np.float32)
        scores = np.asarray(outs[self._score_idx], np.float32).reshape(len(x), -1)[:, 0]
        return maps.reshape(len(x), maps.shape[-2], maps.shape[-1])[:n].copy(), scores[:n].copy()
