"""Reading weight files and loading them strictly, plus the offline Hugging Face cache lookup.

Nothing here downloads: ``weights=`` files / snapshot folders are local, and ``pretrained=True``
for the timm ViTs resolves a file already present in the user's Hugging Face hub cache.

A Hugging Face snapshot folder (``save_pretrained`` output or ``hf download`` target) is read as
one state dict: ``model.safetensors``, or every shard listed in ``model.safetensors.index.json``,
or ``pytorch_model.bin`` (+ index); its ``config.json`` comes along for layout detection.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

WeightsPath = Union[str, Path]
StateDict = dict[str, torch.Tensor]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".tar")
# Container keys training scripts wrap state dicts in (checked in this order). NVlabs RADIO hub
# checkpoints hold ``state_dict_ema`` next to ``state_dict``; its hub loader prefers the EMA one.
_CONTAINER_KEYS = ("state_dict_ema", "state_dict", "model", "model_ema", "module", "teacher")
# Files of a Hugging Face snapshot folder, in the order they are looked for: (single file, index).
SNAPSHOT_FILES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_MAX_LISTED = 5  # offending keys named per category in an error message


class IncompatibleWeightsError(ValueError):
    """A weights file does not fit the backbone (missing / unexpected keys or wrong shapes)."""


@dataclass
class WeightsFile:
    """What a local weights file or snapshot folder holds.

    Attributes:
        path: the file or folder given.
        state_dict: every tensor, CPU, keys as stored (shards merged).
        config: the folder's ``config.json`` (None for a single file).
        files: the files read, weights and ``config.json``, in hashing order.
        extras: non-tensor entries of a pickled checkpoint next to its state dict (e.g. RADIO's
            ``args`` namespace), as stored.
    """

    path: Path
    state_dict: StateDict
    config: dict[str, Any] | None = None
    files: list[Path] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def read_weights(path: WeightsPath) -> WeightsFile:
    """Read a local weights file or Hugging Face snapshot folder (never downloads).

    Args:
        path: ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.pth.tar`` file, or a folder
            with ``model.safetensors`` (or its sharded ``.index.json``) / ``pytorch_model.bin``
            and, usually, ``config.json``.

    Raises:
        FileNotFoundError: the path, or a shard an index names, does not exist; a folder holds
            no known weights file (the message lists what it holds).
        ValueError: unknown suffix, or no name -> tensor mapping inside.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_snapshot(path)
    extras: dict[str, Any] = {}
    state_dict = _read_file(path, extras)
    return WeightsFile(path=path, state_dict=state_dict, files=[path], extras=extras)


def _read_snapshot(folder: Path) -> WeightsFile:
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    for single, index in SNAPSHOT_FILES:
        if (folder / single).is_file():
            weight_files = [folder / single]
            break
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            weight_files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [str(f.name) for f in weight_files if not f.is_file()]
            if missing or not weight_files:
                raise FileNotFoundError(
                    f"{folder / index} names shards that are not in the folder: {', '.join(missing) or '(none listed)'}; "
                    "download every shard of the snapshot"
                )
            break
    else:
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise FileNotFoundError(
            f"snapshot folder {folder} holds none of {', '.join(n for pair in SNAPSHOT_FILES for n in pair)} "
            f"(it holds: {', '.join(present) or 'nothing'}); pass the weights file itself or download the "
            "repository's model.safetensors"
        )
    state_dict: StateDict = {}
    for weight_file in weight_files:
        part = _read_file(weight_file, {})
        clash = sorted(set(part) & set(state_dict))
        if clash:
            raise ValueError(f"shard {weight_file} repeats keys of another shard: {clash[:3]}")
        state_dict.update(part)
    files = weight_files + ([config_path] if config is not None else [])
    return WeightsFile(path=folder, state_dict=state_dict, config=config, files=files)


def read_state_dict(path: WeightsPath) -> StateDict:
    """The state dict of :func:`read_weights` (a file or snapshot folder), keys as stored."""
    return read_weights(path).state_dict


def weights_sha256(files: Sequence[Path]) -> str:
    """Hex sha256 identifying weights: of the file itself when there is one file, else of the
    lines ``"<sha256 of file>  <file name>\n"`` of every file in order (a snapshot folder's
    weights + config.json), i.e. of the ``sha256sum`` listing of the folder's files."""
    digests = []
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        digests.append((digest.hexdigest(), Path(path).name))
    if len(digests) == 1:
        return digests[0][0]
    listing = "".join(f"{hexdigest}  {name}\n" for hexdigest, name in digests)
    return hashlib.sha256(listing.encode()).hexdigest()


def _read_file(path: Path, extras: dict[str, Any]) -> StateDict:
    """One weights file -> state dict; non-tensor entries next to it go to ``extras``."""
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (expected a {' / '.join(WEIGHT_SUFFIXES)} file or a "
            "Hugging Face snapshot folder)"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path), device="cpu")
    elif suffix in (".pth", ".pt", ".bin", ".tar"):
        try:
            # argparse.Namespace: NVlabs RADIO checkpoints store their training args as one; it
            # is a plain attribute container, so allowing it keeps the load code-free.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as exc:
            if "TorchScript" not in str(exc):
                raise ValueError(f"cannot read weights file {path} with torch.load(weights_only=True): {exc}") from exc
            obj = _read_torchscript(path)
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
        extras.update({k: v for k, v in obj.items() if not isinstance(v, Mapping)})
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _read_torchscript(path: Path) -> StateDict:
    """Tensors of a TorchScript archive (OpenAI CLIP's ``ViT-L-14-336px.pt``).

    ``torch.jit.load`` restores the module's tensors and TorchScript code without unpickling
    Python classes; only ``state_dict()`` is called, no TorchScript method runs.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the reader
        module = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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
