"""Run-directory checkpoints: ``model.safetensors`` + ``config.yaml``.

``config.yaml`` holds everything needed to rebuild the module (method, backbone spec, input /
normalisation, method config, the training hyper-parameters the run used); ``model.safetensors``
holds every persistent tensor (backbone included by default, so no weights download is needed to
convert or deploy a run). :func:`load_detector` rebuilds the detector from the registry alone: no
training code, no data.

Layout of ``config.yaml``::

    format_version: 1
    edge_ad_version: 0.1.0
    method: foundad
    backbone: {name, layers, img_size, weights, pretrained, overrides}
    preprocess: {height, width, mean, std, resize}     # == detector.preprocess_spec
    config: {...}                                      # the method config minus ``backbone``
    training: {...}                                    # free-form, from the training loop
    checkpoint: {includes_backbone: true, num_tensors: N}
    info: {...}                                        # for people and tools; ignored on load
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .base import AnomalyDetector, MethodConfig

__all__ = [
    "CONFIG_FILE",
    "FORMAT_VERSION",
    "MODEL_FILE",
    "CheckpointError",
    "load_checkpoint_config",
    "load_detector",
    "save_checkpoint",
]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
FORMAT_VERSION = 1
_BACKBONE_PREFIX = "backbone."


class CheckpointError(ValueError):
    """A run directory exists but its content cannot rebuild a detector (the message says why)."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the real name


def save_checkpoint(
    detector: AnomalyDetector,
    run_dir: str | Path,
    *,
    training: dict[str, Any] | None = None,
    include_backbone: bool = True,
) -> Path:
    """Write ``run_dir/model.safetensors`` and ``run_dir/config.yaml``.

    Args:
        detector: any registered detector (fitted / trained).
        run_dir: created if missing; existing checkpoint files are replaced.
        training: hyper-parameters of the run (steps, lr, seed, shots, data, ...), plain types.
        include_backbone: store the frozen backbone's tensors too (default). Without them the file
            is small but loading needs ``config.backbone.weights`` / ``pretrained`` to be available.

    Returns:
        ``run_dir`` as a Path.
    """
    import yaml
    from safetensors.torch import save

    from edge_ad._version import __version__

    if not isinstance(detector, AnomalyDetector):
        raise TypeError(f"save_checkpoint expects an AnomalyDetector, got {type(detector).__name__}")
    spec = detector.config.backbone
    if not include_backbone and not (spec.weights or spec.pretrained):
        raise ValueError(
            "include_backbone=False needs config.backbone.weights or pretrained=True, "
            "otherwise the checkpoint could not rebuild the backbone"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    state = detector.state_dict()
    if not include_backbone:
        state = {k: v for k, v in state.items() if not k.startswith(_BACKBONE_PREFIX)}
    # clone(): safetensors refuses tensors that share storage (tied weights, views).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    metadata = {"format": "edge_ad", "format_version": str(FORMAT_VERSION), "method": detector.method}
    _atomic_write_bytes(run_dir / MODEL_FILE, save(tensors, metadata=metadata))

    config = detector.config_dict()
    backbone = config.pop("backbone")
    doc = {
        "format_version": FORMAT_VERSION,
        "edge_ad_version": __version__,
        "method": detector.method,
        "backbone": backbone,
        "preprocess": detector.preprocess_spec.to_dict(),
        "config": config,
        "training": _plain(training or {}),
        "checkpoint": {"includes_backbone": bool(include_backbone), "num_tensors": len(tensors)},
        "info": {
            "grid_size": list(detector.grid_size),
            "feature_dim": detector.feature_dim,
            "score_normalization": detector.normalizer.stats(),
            "trainable_parameters": sum(p.numel() for p in detector.trainable_parameters()),
        },
    }
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
    _atomic_write_bytes(run_dir / CONFIG_FILE, text.encode("utf-8"))
    return run_dir


def _plain(value: Any) -> Any:
    """Make ``value`` YAML-safe: tuples -> lists, paths / other objects -> str, numpy / torch scalars -> numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def load_checkpoint_config(run_dir: str | Path) -> dict[str, Any]:
    """Read and validate ``run_dir/config.yaml`` (no torch work; the method package is imported).

    Raises:
        FileNotFoundError: the directory or ``config.yaml`` is missing.
        CheckpointError: unreadable YAML, unsupported format version, unknown method, bad config.
    """
    import yaml

    from .registry import get_method, list_methods

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a complete run directory (no {CONFIG_FILE})")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} must hold a mapping, got {type(doc).__name__}")
    for key in ("method", "backbone", "config"):
        if key not in doc:
            raise CheckpointError(f"{path} lacks the {key!r} section")
    version = doc.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this edge_ad reads up to {FORMAT_VERSION} (upgrade edge_ad)"
        )
    try:
        get_method(doc["method"])
    except KeyError:
        raise CheckpointError(
            f"{path}: unknown method {doc['method']!r}; registered methods: {', '.join(list_methods())}"
        ) from None
    return doc


def _method_config(doc: dict[str, Any], path: Path) -> MethodConfig:
    from .registry import get_method

    entry = get_method(doc["method"])
    fields = dict(doc["config"] or {})
    if "backbone" in fields:
        raise CheckpointError(f"{path}: 'backbone' belongs at the top level, not inside 'config'")
    fields["backbone"] = doc["backbone"]
    try:
        return entry.config_class.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid {doc['method']} config: {e}") from e


def load_detector(
    run_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    backbone: Any = None,
) -> AnomalyDetector:
    """Rebuild a detector from a run directory (eval mode, on ``device``).

    Args:
        run_dir: directory with ``config.yaml`` and ``model.safetensors``.
        device: where to put the module.
        backbone: an already built backbone to use instead of building ``config.backbone`` (it must
            agree with the config; its tensors are still loaded from the file when included).

    Raises:
        FileNotFoundError: the directory, ``config.yaml`` or ``model.safetensors`` is missing.
        CheckpointError: unknown method, invalid config, preprocessing that disagrees with the
            backbone, or tensors missing / unexpected / of the wrong shape.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from .registry import get_method

    run_dir = Path(run_dir)
    doc = load_checkpoint_config(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise FileNotFoundError(f"{model_path} not found: {run_dir} has a config but no weights ({MODEL_FILE})")
    config = _method_config(doc, cfg_path)
    includes_backbone = bool((doc.get("checkpoint") or {}).get("includes_backbone", True))

    try:
        with safe_open(str(model_path), framework="pt") as f:
            file_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{model_path} is not a readable safetensors file: {e}") from e

    entry = get_method(doc["method"])
    if backbone is None:
        # When the file carries the backbone, skip loading weights: they are overwritten anyway.
        backbone = config.backbone.build(load_weights=not includes_backbone)
    try:
        detector = entry.detector_class(config, backbone=backbone)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot build the {doc['method']} detector: {e}") from e

    if "preprocess" in doc:
        saved = dict(doc["preprocess"])
        built = detector.preprocess_spec.to_dict()
        diff = {k: (saved.get(k), built[k]) for k in built if _differs(saved.get(k), built[k])}
        if diff:
            raise CheckpointError(
                f"{cfg_path}: preprocess disagrees with the rebuilt backbone "
                f"(saved vs built: {diff}); the backbone registry changed since this run was trained"
            )

    expected = {
        k: tuple(v.shape)
        for k, v in detector.state_dict().items()
        if includes_backbone or not k.startswith(_BACKBONE_PREFIX)
    }
    missing = sorted(set(expected) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(file_shapes) if expected[k] != file_shapes[k])
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {_head(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors {_head(unexpected)}")
        if wrong:
            parts.append(
                "shape mismatch " + _head([f"{k}: file {file_shapes[k]} vs config {expected[k]}" for k in wrong])
            )
        raise CheckpointError(
            f"{model_path} does not match {cfg_path} ({doc['method']}): " + "; ".join(parts)
            + ". Were the files edited or mixed from different runs?"
        )
    tensors = load_file(str(model_path), device="cpu")
    detector.load_state_dict(tensors, strict=includes_backbone)
    return detector.to(device).eval()


def _differs(a: Any, b: Any) -> bool:
    if isinstance(b, (list, tuple)):
        if not isinstance(a, (list, tuple)) or len(a) != len(b):
            return True
        return any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(b, float):
        return not isinstance(a, (int, float)) or abs(float(a) - b) > 1e-9 * max(1.0, abs(b))
    return a != b


def _head(items: list[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"
