"""Reading weight files and loading them strictly, plus the offline Hugging Face cache lookup.

Nothing here downloads: ``weights=`` files are local, and ``pretrained=True`` for the timm ViTs
resolves a file already present in the user's Hugging Face hub cache.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

import torch
from torch import nn

WeightsPath = Union[str, Path]
StateDict = dict[str, torch.Tensor]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Container keys training scripts wrap state dicts in (checked in this order).
_CONTAINER_KEYS = ("state_dict", "model", "model_ema", "module", "teacher")
_MAX_LISTED = 5  # offending keys named per category in an error message


class IncompatibleWeightsError(ValueError):
    """A weights file does not fit the backbone (missing / unexpected keys or wrong shapes)."""


def read_state_dict(path: WeightsPath) -> StateDict:
    """Read a local ``.safetensors`` or ``.pth`` / ``.pt`` / ``.bin`` file into a CPU state dict.

    Pickled files are read with ``torch.load(weights_only=True)``: a weights file never runs code.
    A dict wrapping the tensors under ``state_dict`` / ``model`` / ... is unwrapped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown suffix, or the file holds no flat name -> tensor mapping.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (expected a {' / '.join(WEIGHT_SUFFIXES)} file)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling refused (custom classes) or a corrupt file
            raise ValueError(
                f"cannot read weights file {path} with torch.load(weights_only=True): {exc}"
            ) from exc
    else:
        raise ValueError(f"unsupported weights file suffix {path.suffix!r} for {path}; use {WEIGHT_SUFFIXES}")

    # Unwrap training checkpoints ({"model": {...}, "optimizer": ..., "epoch": ...}).
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def strip_prefix(state_dict: StateDict, prefix: str) -> StateDict:
    """Drop ``prefix`` from every key when *all* keys carry it (e.g. a saved ``Backbone`` -> timm)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def load_state_dict_strict(module: nn.Module, state_dict: StateDict, *, source: str, backbone: str) -> None:
    """Load ``state_dict`` into ``module`` all or nothing.

    Every persistent entry of ``module.state_dict()`` must be present with the same shape and no
    extra key may exist; otherwise nothing is loaded and the error names the file, the backbone
    and a few offending keys.

    Raises:
        IncompatibleWeightsError: missing keys, unexpected keys or shape mismatches.
    """
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs expected {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {_listed(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
        raise IncompatibleWeightsError(
            f"weights {source} do not fit backbone {backbone!r} (nothing was loaded; is it the right "
            f"file / model size, and do model overrides match the checkpoint?): " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True)


@contextlib.contextmanager
def hf_hub_offline() -> Iterator[None]:
    """Force ``huggingface_hub`` offline inside the block (env var and the imported constant).

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` at import, so the module constant is patched too.
    """
    previous_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = None
    previous_const = None
    try:
        from huggingface_hub import constants

        previous_const = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        pass
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_env
        if constants is not None:
            constants.HF_HUB_OFFLINE = previous_const


def hf_cache_dir() -> Path:
    """The hub cache the user's ``huggingface_hub`` would use, resolved from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find_in_hf_cache(hub_id: str, filenames: Sequence[str], *, backbone: str) -> Path:
    """Path of the first of ``filenames`` of repo ``hub_id`` in the local hub cache; never downloads.

    Raises:
        FileNotFoundError: none is cached; says which file to place where, or to pass ``weights=``.
    """
    from huggingface_hub import try_to_load_from_cache

    cache_dir = hf_cache_dir()
    with hf_hub_offline():
        for filename in filenames:
            found = try_to_load_from_cache(hub_id, filename, cache_dir=str(cache_dir))
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    raise FileNotFoundError(
        f"pretrained=True for {backbone!r} needs {hub_id}/{filenames[0]} in the local Hugging Face "
        f"cache {cache_dir} (edge_ad never downloads). On a connected machine run "
        f"`hf download {hub_id} {filenames[0]}` and copy the cache folder "
        f"models--{hub_id.replace('/', '--')} into {cache_dir} (or point HF_HUB_CACHE / HF_HOME at it), "
        f"or pass weights=<local .safetensors/.pth> instead"
    )
