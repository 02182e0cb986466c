"""AVA-DINO's trainable head: bottleneck adapters, routed dual adapters, text projection.

Everything trainable in AVA-DINO lives in :class:`AVADinoHead`. At ViT-L width (C = 1024, four
tapped blocks, CLIP ViT-L/14 text width D = 768, bottleneck 768) it has 28,311,552 parameters,
the reference's count: 16 visual adapters (patch / CLS x normal / anomaly x 4 blocks) of
2 * 1024 * 768, two prompt adapters of 2 * 768 * 768 and the 768 -> 1024 text projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TEXT_LAYOUTS

__all__ = ["AVADinoHead", "BottleneckAdapter", "DualAdapter"]


class BottleneckAdapter(nn.Module):
    """``LeakyReLU(W2 LeakyReLU(W1 x))`` without biases: ``dim -> hidden -> dim``.

    Args:
        dim: input / output width.
        hidden: bottleneck width.

    Shape:
        (..., dim) -> (..., dim); :meth:`bottleneck` gives the hidden activation (..., hidden).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.act = nn.LeakyReLU(0.01)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.bottleneck(x)))


class DualAdapter(nn.Module):
    """Normal and anomaly adapters fused by routing weights, with a residual.

    ``f' = w_n * A_n(f) + w_a * A_a(f) + f``.

    Args:
        dim: feature width C.
        hidden: adapter bottleneck width.

    Shape:
        features (B, N, C) or (B, C); w_normal, w_anomaly (B, 1, 1) or (B, 1) (broadcastable).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.normal = BottleneckAdapter(dim, hidden)
        self.anomaly = BottleneckAdapter(dim, hidden)

    def forward(self, features: torch.Tensor, w_normal: torch.Tensor, w_anomaly: torch.Tensor) -> torch.Tensor:
        return w_normal * self.normal(features) + w_anomaly * self.anomaly(features) + features


class AVADinoHead(nn.Module):
    """All trainable AVA-DINO parameters.

    Args:
        feature_dim: ViT width C.
        num_layers: tapped blocks L (one patch and one CLS :class:`DualAdapter` each).
        text_dim: CLIP text embedding width D.
        bottleneck: hidden width of the visual adapters.
        routing_temperature: softmax temperature of :meth:`routing`.
        cross_modal_scale: logit scale of the cross-modal map and the global logits (100).
        calibration_scale: logit scale of the calibration map (10).
        text_layout: how the two adapted prompts become the columns T_n, T_a (see
            :data:`TEXT_LAYOUTS` and :meth:`class_embeddings`).

    Attributes:
        patch_adapters, cls_adapters: L dual adapters each.
        prompt_adapters: two ``D -> D -> D`` adapters (normal, abnormal prompt embedding). As in
            the reference code the *bottleneck* activation ``LeakyReLU(W1 t)`` is the adapted
            prompt; their second layer never enters the forward pass (it gets no gradient) and is
            kept so checkpoints and parameter counts line up with the reference.
        text_projection: ``Linear(D -> C)`` without bias, maps text into the ViT feature space.
    """

    def __init__(self, feature_dim: int, num_layers: int, text_dim: int, bottleneck: int,
                 routing_temperature: float = 0.1, cross_modal_scale: float = 100.0,
                 calibration_scale: float = 10.0, text_layout: str = "paper") -> None:
        super().__init__()
        if text_layout not in TEXT_LAYOUTS:
            raise ValueError(f"text_layout must be one of {TEXT_LAYOUTS}, got {text_layout!r}")
        self.text_layout = text_layout
        self.feature_dim = int(feature_dim)
        self.text_dim = int(text_dim)
        self.routing_temperature = float(routing_temperature)
        self.cross_modal_scale = float(cross_modal_scale)
        self.calibration_scale = float(calibration_scale)
        self.patch_adapters = nn.ModuleList([DualAdapter(feature_dim, bottleneck) for _ in range(num_layers)])
        self.cls_adapters = nn.ModuleList([DualAdapter(feature_dim, bottleneck) for _ in range(num_layers)])
        self.prompt_adapters = nn.ModuleList([BottleneckAdapter(text_dim, text_dim) for _ in range(2)])
        self.text_projection = nn.Linear(text_dim, feature_dim, bias=False)

    def routing(self, cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Routing weights (B, 2) = softmax([cos(cls, P t_n), cos(cls, P t_a)] / temperature).

        Args:
            cls: (B, C) CLS token of one block (not standardised).
            text: (B or 1, 2, D) raw prompt embeddings (row 0 normal, row 1 abnormal).
        """
        t = nn.functional.normalize(self.text_projection(text), dim=-1)  # (B|1, 2, C)
        f = nn.functional.normalize(cls, dim=-1).unsqueeze(1)  # (B, 1, C)
        return torch.softmax((f * t).sum(-1) / self.routing_temperature, dim=-1)

    def class_embeddings(self, text: torch.Tensor) -> torch.Tensor:
        """Adapted, projected prompt embeddings T (B or 1, 2, C): ``P LeakyReLU(W1_k t_k)`` (not normalised,
        as in the reference code)."""
        normal = self.prompt_adapters[0].bottleneck(text[:, 0])
        abnormal = self.prompt_adapters[1].bottleneck(text[:, 1])
        if self.text_layout == "reference":
            # The reference's ``cat([adj0, adj1], 1).view(B, 768, 2)``: column k takes every other
            # entry starting at k of the concatenation, so each column mixes both prompts.
            flat = torch.cat([normal, abnormal], dim=-1)  # (B|1, 2D)
            columns = flat.reshape(flat.shape[0], self.text_dim, 2).transpose(1, 2)  # (B|1, 2, D)
        else:
            columns = torch.stack([normal, abnormal], dim=1)
        return self.text_projection(columns)

    def forward(self, patches: list[torch.Tensor], cls: list[torch.Tensor], text: torch.Tensor,
                training: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                 torch.Tensor | None]:
        """Per-block logits of all tapped blocks.

        Args:
            patches: per block (B, N, C) standardised patch tokens.
            cls: per block (B, C) CLS tokens.
            text: (B or 1, 2, D) prompt embeddings.
            training: also compute the calibration / global / routing outputs.

        Returns:
            cross_modal (B, L, N): anomaly-minus-normal logits ``scale f' . (T_a - T_n)`` (the
            two-class softmax's anomaly channel is their sigmoid); with ``training``, calibration
            logits (B, L, N), global logits (B, L, 2) and routing weights (B, L, 2); else Nones.
        """
        class_emb = self.class_embeddings(text)  # (B|1, 2, C)
        direction = (class_emb[:, 1] - class_emb[:, 0]).unsqueeze(-1)  # (B|1, C, 1)
        cross, calib, glob, routes = [], [], [], []
        for i, (p, c) in enumerate(zip(patches, cls)):
            w = self.routing(c, text)  # (B, 2)
            w_n, w_a = w[:, 0:1], w[:, 1:2]
            f = F.normalize(self.patch_adapters[i](p, w_n.unsqueeze(-1), w_a.unsqueeze(-1)), dim=-1)
            cross.append(self.cross_modal_scale * (f @ direction).squeeze(-1))  # (B, N)
            if training:
                c_adapted = F.normalize(self.cls_adapters[i](c, w_n, w_a), dim=-1)  # (B, C)
                calib.append(self.calibration_scale * (f @ c_adapted.unsqueeze(-1)).squeeze(-1))
                glob.append(self.cross_modal_scale * (c_adapted.unsqueeze(1) @ class_emb.transpose(1, 2)).squeeze(1))
                routes.append(w)
        if not training:
            return torch.stack(cross, dim=1), None, None, None
        return torch.stack(cross, dim=1), torch.stack(calib, dim=1), torch.stack(glob, dim=1), torch.stack(routes, dim=1)
