"""``inspect_weights`` / ``convert_weights``: what a checkpoint is, and one normalised file from it.

Both are the Python side of ``edge-ad weights inspect`` / ``edge-ad weights convert``; the run
directory records :func:`weights_provenance` of the weights a run was trained on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layouts import Layout, detect_layout, radio_summary_indices, radio_summary_note
from .weights import WeightsPath, read_weights, weights_sha256

#: safetensors metadata ``format`` of files written by :func:`convert_weights`.
CONVERTED_FORMAT = "edge_ad.backbone_weights"


@dataclass
class WeightsReport:
    """What :func:`inspect_weights` found.

    Attributes:
        path: the file or snapshot folder.
        layout: detected layout and architecture.
        tensors: number of tensors; parameters: their total element count.
        files: files read (weights shards, ``config.json``).
        sha256: see :func:`edge_ad.backbones.weights.weights_sha256`; None when not computed.
        suggested_backbone: registry name to pass as ``--backbone`` (None: none registered).
        metadata: safetensors metadata of a file written by ``weights convert``.
    """

    path: Path
    layout: Layout
    tensors: int
    parameters: int
    files: list[Path]
    sha256: str | None
    suggested_backbone: str | None
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``--json``)."""
        lay = self.layout
        return {
            "path": str(self.path), "layout": lay.layout, "family": lay.family, "description": lay.describe(),
            "embed_dim": lay.embed_dim, "depth": lay.depth, "patch_size": lay.patch_size,
            "registers": lay.num_registers, "pos_grid": list(lay.pos_grid) if lay.pos_grid else None,
            "native_img_size": lay.native_img_size, "tensors": self.tensors, "parameters": self.parameters,
            "files": [str(f) for f in self.files], "sha256": self.sha256,
            "backbone": self.suggested_backbone, "notes": lay.notes, "metadata": self.metadata,
        }

    def format(self) -> str:
        """Human-readable lines."""
        lines = [f"{self.path}", f"  {self.layout.describe()}",
                 f"  {self.tensors} tensors, {self.parameters / 1e6:.1f} M parameters in {len(self.files)} file(s)"]
        if self.sha256:
            lines.append(f"  sha256 {self.sha256}")
        for key, value in self.layout.notes.items():
            lines.append(f"  {key}: {value}")
        for key, value in self.metadata.items():
            lines.append(f"  metadata {key}: {value}")
        if self.suggested_backbone:
            lines.append(f"  load with: --backbone {self.suggested_backbone} --weights {self.path}")
        else:
            lines.append("  no registered backbone has this architecture")
        return "\n".join(lines)


def _safetensors_metadata(files: list[Path]) -> dict[str, str]:
    if len(files) != 1 or files[0].suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as handle:
        return dict(handle.metadata() or {})


def inspect_weights(path: WeightsPath, *, sha256: bool = True) -> WeightsReport:
    """Detect the layout and architecture of a local weights file or snapshot folder.

    Args:
        path: file or Hugging Face snapshot folder (see ``weights.read_weights``).
        sha256: hash the files (seconds for a ViT-L); False skips it.

    Raises:
        FileNotFoundError, ValueError: unreadable path; IncompatibleWeightsError (a ValueError):
            unknown layout.
    """
    read = read_weights(path)
    layout = detect_layout(read.state_dict, read.config)
    args = read.extras.get("args")  # NVlabs torch-hub checkpoint: training args with the teacher list
    if layout.family == "radio" and "summary_idxs" not in layout.notes and hasattr(args, "teachers"):
        layout.notes["summary_idxs"] = radio_summary_indices(args.teachers)
        layout.notes["anomalyvfm"] = radio_summary_note(layout.notes["summary_idxs"])
    return WeightsReport(
        path=read.path, layout=layout, tensors=len(read.state_dict),
        parameters=sum(int(t.numel()) for t in read.state_dict.values()), files=read.files,
        sha256=weights_sha256(read.files) if sha256 else None, suggested_backbone=layout.suggested_backbone,
        metadata=_safetensors_metadata(read.files),
    )


def weights_provenance(path: WeightsPath) -> dict[str, Any]:
    """What a run directory records about its backbone weights: path, sha256, layout, family, files."""
    report = inspect_weights(path)
    return {"path": str(report.path), "sha256": report.sha256, "layout": report.layout.layout,
            "family": report.layout.family, "description": report.layout.describe(),
            "files": [f.name for f in report.files]}


def convert_weights(
    path: WeightsPath,
    backbone: str,
    out: WeightsPath,
    *,
    img_size: int | tuple[int, int] | None = None,
    **model_overrides: Any,
) -> Path:
    """Convert a checkpoint in any supported layout to one timm-layout ``.safetensors`` file.

    The weights are loaded into ``backbone`` exactly as ``build_backbone(backbone, weights=path)``
    does (detected, converted, checked, strict), then its timm ``state_dict`` is written. The
    default size is the checkpoint's native one (its position-embedding grid x patch size; 224
    for RoPE models), so the absolute position embedding is stored unresampled and the file loads
    at any ``img_size`` later. The safetensors metadata records backbone, source layout and
    source sha256.

    Args:
        path: source file or snapshot folder.
        backbone: registry name the weights are for.
        out: ``.safetensors`` file to write (parent folders are created).
        img_size: build size in pixels; None = native (see above).
        **model_overrides: backbone constructor arguments (tiny test models).

    Returns:
        ``out`` as a Path.

    Raises:
        ValueError: ``out`` is not a ``.safetensors`` path; IncompatibleWeightsError: the weights do
            not fit ``backbone``.
    """
    from safetensors.torch import save_file

    from .registry import build_backbone

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must be a .safetensors file, got {out}")
    report = inspect_weights(path)
    size = img_size if img_size is not None else (report.layout.native_img_size or 224)
    built = build_backbone(backbone, weights=path, img_size=size, **model_overrides)
    model = getattr(built, "model", built)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": CONVERTED_FORMAT, "backbone": backbone, "layout": "timm",
        "source_layout": report.layout.layout, "source_description": report.layout.describe(),
        "source_sha256": report.sha256 or "", "img_size": json.dumps(list(built.info.img_size)),
        "model_overrides": json.dumps(model_overrides, sort_keys=True),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out
