"""VisualAD's per-layer heads: Spatial-Aware Cross-Attention (tokens) and Self-Alignment (patches)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAlignmentMLP", "SpatialCrossAttention", "cosine_to"]


class SpatialCrossAttention(nn.Module):
    """Enhance a token (anomaly or normal) with what one layer's patches contain.

    A few learnable anchor queries (not the token itself: one query against hundreds of keys
    attends too sharply) read the patches; a sigmoid gate computed from the token weighs the
    anchors; the gated sum is projected and added back with a small learnable residual scale, so
    at initialisation the token is almost unchanged.

    ``q = LN(W_q a)`` (anchors a, (A, C)); ``k = LN(W_k (p + e))`` (patches p, learnable key
    positional embedding e); ``v = W_v p``; single head, ``softmax(q k^T / sqrt(C))``;
    ``t' = t + s * W_o(sum_a gate_a(t) * (attn v)_a)`` with ``gate = sigmoid(Linear(C -> A)(t))``.

    Args:
        dim: token / patch channels C.
        num_patches: patches per image N (the key positional embedding's first N rows are used).
        num_anchors: anchor queries A.
        key_pos_tokens: rows of the key positional embedding (>= N; 0 = N).
        res_scale_init: initial residual scale s.
        dropout: on the attention weights and the projected output (training only).

    Shape:
        token (B, C), patches (B, N, C) -> (B, C).
    """

    def __init__(
        self,
        dim: int,
        num_patches: int,
        num_anchors: int = 4,
        key_pos_tokens: int = 0,
        res_scale_init: float = 0.01,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        rows = key_pos_tokens or num_patches
        if rows < num_patches:
            raise ValueError(
                f"key_pos_tokens={key_pos_tokens} is smaller than the {num_patches} patches per image; "
                f"set key_pos_tokens >= {num_patches} (or 0 for exactly the patch count)"
            )
        self.num_patches = int(num_patches)
        self.scale = float(dim) ** -0.5
        self.anchor_queries = nn.Parameter(torch.randn(num_anchors, dim) * 0.02)
        self.key_pos = nn.Parameter(torch.randn(rows, dim) * 0.02)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim)
        self.k_norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, num_anchors)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.res_scale = nn.Parameter(torch.full((1,), float(res_scale_init)))
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, token: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        q = self.q_norm(self.q_proj(self.anchor_queries))  # (A, C): anchors are batch-independent
        # Static slice: the patch count is fixed at build time, so the export holds a constant.
        k = self.k_norm(self.k_proj(patches + self.key_pos[: self.num_patches]))  # (B, N, C)
        v = self.v_proj(patches)  # (B, N, C)
        attn = torch.softmax(torch.matmul(q * self.scale, k.transpose(1, 2)), dim=-1)  # (B, A, N)
        anchors = torch.matmul(self.dropout(attn), v)  # (B, A, C)
        gate = torch.sigmoid(self.gate(token)).unsqueeze(-1)  # (B, A, 1)
        mixed = (anchors * gate).sum(dim=1)  # (B, C)
        return token + self.res_scale * self.dropout(self.out_proj(mixed))


class SelfAlignmentMLP(nn.Module):
    """Token-wise ``Linear -> GELU -> (dropout) -> Linear`` mapping patches into the space where
    they are compared with the tokens; no residual (the reference replaces the features).

    Shape: (B, N, C) -> (B, N, C).
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(patches))))


def cosine_to(patches: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Cosine similarity (B, N) of each patch (B, N, C) with a per-image token (B, C)."""
    p = F.normalize(patches, dim=-1, eps=1e-8)
    t = F.normalize(token, dim=-1, eps=1e-8)
    return torch.matmul(p, t.unsqueeze(-1)).squeeze(-1)
