"""The targets registry: where a bundle runs, with which engine, at which precisions.

A *target* names a deployment platform (``jetson-orin``, ``intel-cpu``, ...) and pins what the
converters may produce for it and what the runtime must check when it loads a bundle: the engine
(``"tensorrt"``, ``"openvino"``, ``"onnxruntime"``), the engine's device string, the precisions
allowed and the default one, whether the platform has DLA cores, and for OpenVINO the inference
precision hint that is always written into the bundle (OpenVINO's CPU plugin otherwise silently
picks bf16 on CPUs with AMX / AVX512_BF16).

The registry lives in the torch-free runtime (and is re-exported by ``edge_ad.converters.targets``)
because both sides need it: the converters choose precisions and hints from it, and
:func:`edge_ad.runtime.load_bundle` validates a manifest's ``target`` / ``precision`` / ``engine``
against it, and the runtime may not import the converters. ``edge-ad targets`` prints it.

Adding a target is one :class:`Target` entry in ``_BUILTIN`` below (or :func:`register_target`
from user code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "ENGINES",
    "OPENVINO_PRECISION_HINTS",
    "PRECISIONS",
    "Target",
    "UnknownTargetError",
    "get_target",
    "list_targets",
    "register_target",
]

#: Engines a bundle can name. The runtime has one engine module per name.
ENGINES = ("tensorrt", "openvino", "onnxruntime")
#: Compute precisions a bundle can declare (``int8`` = Q/DQ or NNCF-quantised model).
PRECISIONS = ("fp32", "fp16", "int8")
#: OpenVINO ``INFERENCE_PRECISION_HINT`` values a bundle may pin. bf16 is left out on purpose: it
#: is never chosen silently; add a ``bf16`` precision first if a target ever wants it.
OPENVINO_PRECISION_HINTS = ("f32", "f16")


class UnknownTargetError(KeyError, ValueError):
    """No target of that name is registered (a ``KeyError`` for lookups, a ``ValueError`` for the CLI)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Target:
    """One deployment platform.

    Attributes:
        name: registry key, lower-case with dashes (``"jetson-orin"``).
        engine: ``"tensorrt"``, ``"openvino"`` or ``"onnxruntime"``.
        device: the engine's device string: OpenVINO ``"CPU"`` / ``"GPU"`` / ``"NPU"``; ``"GPU"``
            for TensorRT; ``"CPU"`` for onnxruntime's CPU execution provider.
        precisions: precisions the converters may produce for this target.
        default_precision: used when the user asks for none (FP16 for TensorRT: ViTs lose little
            at FP16, INT8 is opt-in because it needs calibration and a fidelity check).
        dla: the platform family has NVIDIA DLA cores (module-dependent: e.g. Orin Nano has none).
        openvino_hint: OpenVINO ``INFERENCE_PRECISION_HINT`` for the default precision and for the
            non-quantised parts of an INT8 model; ``None`` for other engines.
        compute_capability: CUDA SM version where it is fixed by the platform (Jetson), else None.
        description: one line for ``edge-ad targets``.
    """

    name: str
    engine: str
    device: str
    precisions: tuple[str, ...]
    default_precision: str
    description: str
    dla: bool = False
    openvino_hint: str | None = None
    compute_capability: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "precisions", tuple(self.precisions))
        if not self.name or self.name != self.name.strip().lower() or " " in self.name:
            raise ValueError(f"target name must be lower-case without spaces, got {self.name!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"target {self.name!r}: engine must be one of {ENGINES}, got {self.engine!r}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise ValueError(
                f"target {self.name!r}: precisions must be a non-empty subset of {PRECISIONS}, got {self.precisions}"
            )
        if self.default_precision not in self.precisions:
            raise ValueError(
                f"target {self.name!r}: default_precision {self.default_precision!r} "
                f"is not in its precisions {self.precisions}"
            )
        if self.engine == "openvino":
            if self.openvino_hint not in OPENVINO_PRECISION_HINTS:
                raise ValueError(
                    f"target {self.name!r}: OpenVINO targets must pin openvino_hint to one of "
                    f"{OPENVINO_PRECISION_HINTS}, got {self.openvino_hint!r}"
                )
        elif self.openvino_hint is not None:
            raise ValueError(f"target {self.name!r}: openvino_hint is only for OpenVINO targets")
        if self.dla and self.engine != "tensorrt":
            raise ValueError(f"target {self.name!r}: dla=True needs the tensorrt engine")

    def openvino_precision_hint(self, precision: str) -> str | None:
        """The ``INFERENCE_PRECISION_HINT`` to pin for ``precision`` (None for non-OpenVINO targets).

        fp32 -> ``"f32"``; fp16 / int8 -> the target's hint: ``"f32"`` on CPU (an FP16 IR only
        compresses weights there; the hint stops AMX / AVX512-BF16 CPUs from computing in bf16),
        ``"f16"`` on GPU / NPU (their native float type). Same rule as
        ``edge_ad.converters.openvino.inference_precision_hint``.
        """
        self.check_precision(precision)
        if self.engine != "openvino":
            return None
        return "f32" if precision == "fp32" else self.openvino_hint

    def engine_hints(self, precision: str) -> dict[str, str]:
        """The ``engine.hints`` a bundle for this target and ``precision`` carries by default."""
        hint = self.openvino_precision_hint(precision)
        return {"INFERENCE_PRECISION_HINT": hint} if hint is not None else {}

    def check_precision(self, precision: str) -> None:
        """Raise ``ValueError`` naming the allowed precisions when ``precision`` is not one of them."""
        if precision not in self.precisions:
            raise ValueError(
                f"precision {precision!r} is not available on target {self.name!r} "
                f"(allowed: {', '.join(self.precisions)}; default {self.default_precision})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-type view (JSON / YAML)."""
        return {
            "name": self.name,
            "engine": self.engine,
            "device": self.device,
            "precisions": list(self.precisions),
            "default_precision": self.default_precision,
            "dla": self.dla,
            "openvino_hint": self.openvino_hint,
            "compute_capability": list(self.compute_capability) if self.compute_capability else None,
            "description": self.description,
        }


_BUILTIN: tuple[Target, ...] = (
    Target(
        "jetson-orin", "tensorrt", "GPU", ("fp32", "fp16", "int8"), "fp16",
        "NVIDIA Jetson AGX Orin / Orin NX / Orin Nano (JetPack 6, TensorRT 10); DLA on AGX and NX only",
        dla=True, compute_capability=(8, 7),
    ),
    Target(
        "jetson-xavier", "tensorrt", "GPU", ("fp32", "fp16", "int8"), "fp16",
        "NVIDIA Jetson AGX Xavier / Xavier NX (JetPack 5, TensorRT 8.5); 2 DLA cores",
        dla=True, compute_capability=(7, 2),
    ),
    Target(
        "x86-tensorrt", "tensorrt", "GPU", ("fp32", "fp16", "int8"), "fp16",
        "x86-64 with an NVIDIA discrete GPU and TensorRT 10",
    ),
    Target(
        "intel-cpu", "openvino", "CPU", ("fp32", "fp16", "int8"), "fp32",
        "Intel / x86 CPU through OpenVINO; hint pinned to f32 (fp16 = compressed weights; no silent bf16)",
        openvino_hint="f32",
    ),
    Target(
        "intel-gpu", "openvino", "GPU", ("fp32", "fp16", "int8"), "fp16",
        "Intel integrated / Arc GPU through OpenVINO",
        openvino_hint="f16",
    ),
    Target(
        "intel-npu", "openvino", "NPU", ("fp16", "int8"), "fp16",
        "Intel Core Ultra NPU through OpenVINO (computes in fp16 / int8 only)",
        openvino_hint="f16",
    ),
    Target(
        "onnx-cpu", "onnxruntime", "CPU", ("fp32", "int8"), "fp32",
        "any CPU through onnxruntime's CPU execution provider (portable fallback, reference)",
    ),
)

_REGISTRY: dict[str, Target] = {t.name: t for t in _BUILTIN}


def register_target(target: Target, *, replace: bool = False) -> Target:
    """Add ``target`` to the registry (``replace=True`` to redefine an existing name)."""
    if not isinstance(target, Target):
        raise TypeError(f"register_target expects a Target, got {type(target).__name__}")
    if target.name in _REGISTRY and not replace:
        raise ValueError(f"target {target.name!r} is already registered (pass replace=True to redefine it)")
    _REGISTRY[target.name] = target
    return target


def get_target(name: str) -> Target:
    """The registered target called ``name``.

    Raises:
        UnknownTargetError: (a ``KeyError``) unknown name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownTargetError(
            f"unknown target {name!r}; registered targets: {', '.join(list_targets())} "
            "(see `edge-ad targets`, or register_target() a new one)"
        ) from None


def list_targets() -> list[str]:
    """Registered target names, in registration order."""
    return list(_REGISTRY)
