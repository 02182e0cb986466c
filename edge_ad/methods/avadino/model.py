"""AVA-DINO detector: frozen ViT + text-routed anomaly-aware dual adapters + CLIP prompt embeddings.

After "Anomaly-Aware Vision-Language Adapters for Zero-Shot Anomaly Detection" (Aqeel et al.,
2026) and its public code. Per tapped block i of a frozen DINOv3 (patch tokens ``P_i`` (B, N, C)
standardised per image over the tokens, CLS ``c_i`` (B, C), both through the final norm):

* routing ``w = softmax([cos(c_i, W t_n), cos(c_i, W t_a)] / 0.1)`` with ``t_n, t_a`` the CLIP
  normal / abnormal prompt-ensemble embeddings of the class name and ``W`` a learned
  ``Linear(D -> C)``;
* ``f' = normalize(w_n A_n(P_i) + w_a A_a(P_i) + P_i)`` and the same for the CLS token with its own
  adapters (``cls'``);
* cross-modal map ``softmax(100 f' . T)`` with ``T = W [prompt_adapter_k(t_k)]`` (B, 2, C); its
  anomaly channel equals ``sigmoid(100 f' . (T_a - T_n))``, which is what is computed (one channel
  instead of two, bilinear upsampling commutes with the difference);
* calibration map ``sigmoid(10 f' . cls')`` and global logits ``100 cls' . T`` (training only).

Maps are upsampled to the input size (bilinear, ``align_corners=True`` as the reference), the
probabilities averaged over blocks; the anomaly map is the cross-modal one, the image score its
maximum. The text encoder never runs here: the deployment class's (2, D) embedding is the buffer
``text_features``, a constant of the exported graph.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from edge_ad.backbones.base import Backbone

from ..base import AnomalyDetector, DetectorOutput
from .adapters import AVADinoHead
from .config import AVADinoConfig
from .text import TextEmbeddings

__all__ = ["AVADino", "AVADinoOutputs", "set_class_name", "standardize_tokens"]


class AVADinoOutputs(NamedTuple):
    """Training outputs of :meth:`AVADino.forward` with ``train_outputs=True``.

    Attributes:
        cross_modal: (B, 1, H, W) anomaly probability of the cross-modal map, mean over blocks.
        calibration: (B, 1, H, W) anomaly probability of the calibration map, mean over blocks.
        global_logits: (B, 2) image logits (normal, anomalous), mean over blocks.
        routing: (B, 2) routing weights (w_normal, w_anomaly), mean over blocks.
    """

    cross_modal: torch.Tensor
    calibration: torch.Tensor
    global_logits: torch.Tensor
    routing: torch.Tensor


def standardize_tokens(tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per image and channel, over the tokens: ``(x - mean) / (std + eps)`` (unbiased std, as the
    reference), (B, N, C) -> (B, N, C). Removes the image's global offset so adapters see contrast."""
    mean = tokens.mean(dim=1, keepdim=True)
    std = tokens.std(dim=1, keepdim=True)
    return (tokens - mean) / (std + eps)


class AVADino(AnomalyDetector):
    """AVA-DINO detector (see the module docstring).

    Inference: ``forward(images)`` -> :class:`DetectorOutput` with the stored class embedding.
    Training: ``forward(images, train_outputs=True, text=(B, 2, D))`` -> :class:`AVADinoOutputs`
    with per-sample prompt embeddings (each sample's own category); :mod:`.loss` turns them into
    the reference loss.

    Args:
        config: :class:`AVADinoConfig`.
        backbone: a built ViT backbone (default: built from ``config.backbone``).

    Attributes:
        head: :class:`AVADinoHead` (the only trainable part).
        text_features: (2, D) buffer, the deployment class's prompt embeddings (row 0 normal,
            row 1 abnormal); zeros until a class name is set.
    """

    method = "avadino"
    config_class = AVADinoConfig
    fit_mode = "supervised"

    def __init__(self, config: AVADinoConfig, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        cfg: AVADinoConfig = self.config  # type: ignore[assignment]
        model = getattr(self.backbone, "model", None)
        info = self.backbone.info
        if model is None or not hasattr(model, "forward_intermediates") or info.num_prefix_tokens < 1:
            raise TypeError(
                f"AVA-DINO needs a ViT backbone with a CLS token (dinov3_*, dinov2_*, radio_*), got {info.name!r}"
            )
        if len(set(info.feature_dims)) != 1:
            raise ValueError(f"AVA-DINO taps blocks of one width, got feature_dims {info.feature_dims}")
        self.num_layers = len(info.layers)
        self.width = int(info.feature_dims[0])
        self.head = AVADinoHead(self.width, self.num_layers, cfg.text_dim, cfg.bottleneck, cfg.routing_temperature,
                                cfg.cross_modal_scale, cfg.calibration_scale, cfg.text_layout)
        self.register_buffer("text_features", torch.zeros(2, cfg.text_dim))
        self._text: TextEmbeddings | None = None

    # ------------------------------------------------------------------ text
    def text_source(self) -> TextEmbeddings:
        """Class name -> (2, D) embeddings from ``config.text_model`` / ``config.text_embeddings``."""
        if self._text is None:
            cfg: AVADinoConfig = self.config  # type: ignore[assignment]
            if cfg.text_model is None and cfg.text_embeddings is None:
                raise RuntimeError(
                    "AVA-DINO needs CLIP prompt embeddings: set text_model=LOCAL_CLIP_DIR or "
                    "text_embeddings=FILE.safetensors in the config (training), or call "
                    "set_class_name(..., text_model=... | embeddings=...) before inference"
                )
            self._text = TextEmbeddings(cfg.text_model, cfg.text_embeddings, dim=cfg.text_dim)
        return self._text

    def text_for_categories(self, categories: list[str] | tuple[str, ...]) -> torch.Tensor:
        """(B, 2, D) prompt embeddings of training category folders (names via ``config.class_names``)."""
        cfg: AVADinoConfig = self.config  # type: ignore[assignment]
        source = self.text_source()
        return source.stack([cfg.class_name_for(c) for c in categories]).to(self.text_features)

    @torch.no_grad()
    def set_class_name(self, name: str, *, text_model: str | Path | None = None,
                       embeddings: str | Path | None = None) -> "AVADino":
        """Store the prompt embeddings of ``name`` as the deployment class (the exported constant).

        Args:
            name: the class name to detect anomalies of ("hazelnut", "metal nut", ...).
            text_model, embeddings: where to get the embedding; None = the config's sources.
        """
        cfg: AVADinoConfig = self.config  # type: ignore[assignment]
        if text_model is not None or embeddings is not None:
            source = TextEmbeddings(text_model, embeddings, dim=cfg.text_dim)
        else:
            source = self.text_source()
        emb = source(name)
        self.text_features.copy_(emb.to(self.text_features))
        self.config = cfg.replace(class_name=name.strip())
        return self

    def _ensure_class_name(self) -> None:
        # Python-side state only (no tensor values): exports trace past it once a name is set.
        cfg: AVADinoConfig = self.config  # type: ignore[assignment]
        if cfg.class_name is None:
            self.set_class_name(cfg.default_class_name)

    # ------------------------------------------------------------------ features
    def tokens(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per tapped block: standardised patch tokens (B, N, C) and the CLS token (B, C), both after
        the backbone's final norm.

        The backbone is called as a module (its patch maps are the patch tokens) so exported node
        names keep their ``/backbone/blocks.N/...`` scopes, which the INT8 converters select by;
        the per-block CLS tokens, which the backbone does not return, are read with forward hooks
        on the tapped blocks and put through the same final norm.
        """
        model = self.backbone.model
        blocks = [model.blocks[i] for i in self.backbone.info.layers]
        captured: dict[int, torch.Tensor] = {}

        def keep_cls(index: int):
            def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
                captured[index] = output[:, 0]
            return hook

        handles = [blk.register_forward_hook(keep_cls(i)) for i, blk in enumerate(blocks)]
        try:
            maps, _ = self.backbone(images)
        finally:
            for h in handles:
                h.remove()
        patches = [standardize_tokens(m.flatten(2).transpose(1, 2)) for m in maps]
        cls = [model.norm(captured[i]) for i in range(len(blocks))]
        return patches, cls

    def _maps(self, images: torch.Tensor, text: torch.Tensor, training: bool):
        """(cross-modal prob (B, 1, H, W), calibration prob | None, global logits (B, 2) | None,
        routing (B, 2) | None), block means."""
        if training:
            with torch.no_grad():  # frozen encoder: keep no activations for backward
                patches, cls = self.tokens(images)
        else:
            patches, cls = self.tokens(images)
        cross, calib, glob, routes = self.head(patches, cls, text, training=training)
        cross_modal = self._upsampled_probability(cross)
        if not training:
            return cross_modal, None, None, None
        return cross_modal, self._upsampled_probability(calib), glob.mean(1), routes.mean(1)

    def _upsampled_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-block patch logits (B, L, N) -> mean over blocks of sigmoid(upsampled logits), (B, 1, H, W)."""
        h, w = self.grid_size
        up = F.interpolate(logits.float().reshape(-1, self.num_layers, h, w), size=self.image_size,
                           mode="bilinear", align_corners=True)
        return torch.sigmoid(up).mean(dim=1, keepdim=True)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, train_outputs: bool = False,  # type: ignore[override]
                text: torch.Tensor | None = None) -> DetectorOutput | AVADinoOutputs:
        """Inference (:class:`DetectorOutput`) or, with ``train_outputs``, :class:`AVADinoOutputs`.

        Args:
            images: (B, 3, H, W) normalised with :attr:`preprocess_spec`.
            train_outputs: return the training outputs.
            text: (B, 2, D) per-sample prompt embeddings (training); None = the stored class.
        """
        if not train_outputs:
            if text is not None:
                raise ValueError("text= is for training outputs; inference uses the stored class (set_class_name)")
            return super().forward(images)
        self.check_images(images)
        if text is None:
            self._ensure_class_name()
            text = self.text_features.unsqueeze(0)
        if text.ndim == 2:
            text = text.unsqueeze(0)
        cfg: AVADinoConfig = self.config  # type: ignore[assignment]
        if text.ndim != 3 or text.shape[1:] != (2, cfg.text_dim) or text.shape[0] not in (1, images.shape[0]):
            raise ValueError(
                f"text must be (B, 2, {cfg.text_dim}) prompt embeddings (normal, abnormal) for B={images.shape[0]}, "
                f"got {tuple(text.shape)}"
            )
        return AVADinoOutputs(*self._maps(images, text.to(images.dtype), training=True))

    def forward_raw(self, images: torch.Tensor) -> DetectorOutput:
        """Cross-modal anomaly probability map (B, 1, H, W) in [0, 1] and its maximum (B,)."""
        self.check_images(images)
        self._ensure_class_name()
        prob, _, _, _ = self._maps(images, self.text_features.unsqueeze(0), training=False)
        anomaly_map = self.smoother(prob)
        return DetectorOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))

    def extra_repr(self) -> str:
        cfg: AVADinoConfig = self.config  # type: ignore[assignment]
        return (f"grid={self.grid_size}, width={self.width}, layers={self.backbone.info.layers}, "
                f"text_dim={cfg.text_dim}, class_name={cfg.class_name!r}")


def set_class_name(
    target: AVADino | str | Path,
    name: str,
    *,
    text_model: str | Path | None = None,
    embeddings: str | Path | None = None,
    out: str | Path | None = None,
) -> AVADino | Path:
    """Set the deployment class name of an AVA-DINO detector or run directory.

    The prompt embeddings of ``name`` replace the detector's ``text_features`` buffer, so a later
    ``convert`` exports them as constants (the device runs no text encoder). The score
    normalisation is kept: it is an affine map, so AUROC and thresholds fitted later (``convert``
    fits them on the bundle's own outputs) are unaffected.

    Args:
        target: an :class:`AVADino` (changed in place and returned) or a run directory (re-saved;
            the path is returned).
        name: class name for the prompts ("hazelnut").
        text_model: local CLIP directory; embeddings: precomputed ``.safetensors`` file; None for
            both = the sources recorded in the run's config.
        out: for a run directory, where to write the updated run (default: in place).

    Examples:
        >>> set_class_name("runs/ava", "hazelnut", text_model="/models/clip-vit-large-patch14-336",
        ...                out="runs/ava_hazelnut")   # then: convert("runs/ava_hazelnut", "intel-cpu", ...)
    """
    if isinstance(target, AVADino):
        return target.set_class_name(name, text_model=text_model, embeddings=embeddings)
    from ..checkpoint import load_checkpoint_config, load_detector, save_checkpoint

    run_dir = Path(target)
    doc = load_checkpoint_config(run_dir)
    if doc["method"] != AVADino.method:
        raise ValueError(f"{run_dir} is a {doc['method']!r} run; set_class_name applies to avadino runs")
    detector = load_detector(run_dir)
    detector.set_class_name(name, text_model=text_model, embeddings=embeddings)
    include_backbone = bool((doc.get("checkpoint") or {}).get("includes_backbone", True))
    dest = Path(out) if out is not None else run_dir
    if dest != run_dir:
        _copy_side_files(run_dir, dest)
    save_checkpoint(detector, dest, training=doc.get("training") or {}, include_backbone=include_backbone)
    return dest


def _copy_side_files(src: Path, dest: Path) -> None:
    """Logs beside the checkpoint (train_log.json, loss_curve.csv) travel with a re-saved run."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("train_log.json", "loss_curve.csv"):
        if (src / name).is_file():
            shutil.copy2(src / name, dest / name)

