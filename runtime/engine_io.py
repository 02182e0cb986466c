"""The engine's real input / output tensors against the bundle manifest, checked at ``Detector.load``.

A manifest that does not describe its model (hand-edited, or a model file swapped after the
manifest was written and re-sealed) used to surface late: an IndexError deep in an engine, or a
wrong output silently read as the score. Every engine reports what its compiled model really
has (:meth:`io_specs`: names, shapes, dtypes); :func:`check_engine_io` compares that with the
manifest and refuses with one message naming both sides.

Rules (a dimension that is dynamic on either side matches anything):

* exactly one input, shaped (batch, 3, input.height, input.width), of dtype ``input.dtype``;
  the batch must equal ``input.batch`` when both are fixed;
* every manifest output exists under its name with the manifest's rank, fixed dimensions and dtype.

Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle import BundleError

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle

__all__ = ["TensorSpec", "check_engine_io", "dtype_name"]


@dataclass(frozen=True)
class TensorSpec:
    """One engine tensor: ``name``, ``shape`` (ints; None or a string for a dynamic dimension), ``dtype`` name."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str
    #: further names of the same tensor (OpenVINO ports carry a set of names; any of them addresses it)
    aliases: tuple[str, ...] = ()

    def __str__(self) -> str:
        dims = ", ".join("?" if not isinstance(d, int) else str(d) for d in self.shape)
        return f"{self.name!r} ({dims}) {self.dtype}"


def dtype_name(dtype: Any) -> str:
    """numpy dtype (or anything ``np.dtype`` takes) / onnxruntime ``'tensor(float)'`` -> ``'float32'``-style name."""
    text = str(dtype)
    onnx_names = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
                  "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8",
                  "tensor(int8)": "int8", "tensor(bool)": "bool"}
    if text in onnx_names:
        return onnx_names[text]
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text


def _dims_match(engine: tuple, manifest: tuple) -> bool:
    if len(engine) != len(manifest):
        return False
    return all(not isinstance(e, int) or not isinstance(m, int) or e == m for e, m in zip(engine, manifest))


def check_engine_io(bundle: "Bundle", engine: Any) -> None:
    """Refuse an engine whose tensors differ from ``bundle.manifest`` (see the module rules).

    Engines without ``io_specs`` (custom ones) are not checked.

    Raises:
        BundleError: naming the engine's tensor and what the manifest says.
    """
    report = getattr(engine, "io_specs", None)
    if report is None:
        return
    inputs, outputs = report()
    m = bundle.manifest
    where = f"bundle {bundle.source}: the {engine.name} model"
    fix = ("the manifest does not describe this model (a model file swapped or a hand-edited manifest); "
           "re-export the bundle with edge-ad convert")
    want_in = (m.input.batch, 3, m.input.height, m.input.width)
    want_in_text = (f"({m.input.batch if m.input.batch is not None else '?'}, 3, {m.input.height}, "
                    f"{m.input.width}) {m.input.dtype}")
    if len(inputs) != 1:
        raise BundleError(f"{where} has inputs {', '.join(map(str, inputs)) or 'none'}; the manifest says one image "
                          f"input {want_in_text}: {fix}")
    got = inputs[0]
    if not _dims_match(tuple(got.shape), want_in) or got.dtype != m.input.dtype:
        raise BundleError(f"{where} has input {got}; the manifest says {want_in_text}: {fix}")
    by_name = {name: o for o in outputs for name in (o.name, *o.aliases)}
    for spec in m.outputs:
        want = f"{spec.name!r} ({', '.join(str(d) for d in spec.shape)}) {spec.dtype}"
        out = by_name.get(spec.name)
        if out is None:
            raise BundleError(f"{where} has no output {spec.name!r} (it has {', '.join(map(str, outputs))}); the "
                              f"manifest says {want}: {fix}")
        if not _dims_match(tuple(out.shape), tuple(spec.shape)) or out.dtype != spec.dtype:
            raise BundleError(f"{where} has output {out}; the manifest says {want}: {fix}")
