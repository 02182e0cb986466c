"""DoRA / LoRA adapters on a timm ViT's attention through ``peft``, and merging them away.

What is adapted (every block): the q and v slices of the fused ``attn.qkv`` Linear and the
output projection ``attn.proj``.

Why a split: peft adapts whole modules, and timm fuses q, k and v into one ``Linear(C, 3C)``.
An adapter on the fused layer would also change k, and a DoRA magnitude vector would rescale k's
rows. :class:`SplitQKV` therefore replaces ``attn.qkv`` by three ``Linear(C, C)`` children
``q``, ``k``, ``v`` holding exactly the rows of the fused weight (its forward concatenates them,
so timm's ``Attention.forward`` is unchanged and the output is bit-identical), and peft targets
``attn.qkv.q``, ``attn.qkv.v`` and ``attn.proj`` by regular expression (a plain suffix list would
also hit ``patch_embed.proj``). :func:`merge_adapters` folds the adapters into the weights with
peft's own merge (DoRA's magnitude included) and fuses q / k / v back into one ``Linear``: the
result is a plain timm ViT with timm's state-dict keys, which loads and exports without peft.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ADAPTER_TARGETS", "SplitQKV", "add_adapters", "adapter_parameters", "has_adapters", "merge_adapters"]

#: peft ``target_modules`` regular expression (full match on module names under the ViT).
ADAPTER_TARGETS = r".*blocks\.\d+\.attn\.(qkv\.q|qkv\.v|proj)"


class SplitQKV(nn.Module):
    """A fused ``Linear(C, 3C)`` held as three ``Linear(C, C)`` (``q``, ``k``, ``v``).

    ``forward(x (..., C)) -> (..., 3C)`` = ``cat([q(x), k(x), v(x)], -1)``, i.e. the fused layer's
    output (timm orders the fused rows q, k, v).
    """

    def __init__(self, dim: int, bias: bool = True, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.k = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)
        self.v = nn.Linear(dim, dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_fused(cls, fused: nn.Linear) -> "SplitQKV":
        """Copy a fused ``Linear(C, 3C)`` (same device / dtype, no grad)."""
        out_features, dim = fused.weight.shape
        if out_features != 3 * dim:
            raise ValueError(f"attn.qkv must be Linear(C, 3C), got Linear({dim}, {out_features})")
        split = cls(dim, fused.bias is not None, device=fused.weight.device, dtype=fused.weight.dtype)
        with torch.no_grad():
            for i, part in enumerate((split.q, split.k, split.v)):
                part.weight.copy_(fused.weight[i * dim:(i + 1) * dim])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * dim:(i + 1) * dim])
        split.requires_grad_(fused.weight.requires_grad)
        return split

    def fuse(self) -> nn.Linear:
        """The equivalent fused ``Linear(C, 3C)``; q / k / v must be plain Linears (merge first)."""
        parts = (self.q, self.k, self.v)
        if not all(type(p) is nn.Linear for p in parts):
            raise RuntimeError("SplitQKV.fuse(): q / k / v still carry adapters; merge them first")
        w = self.q.weight
        fused = nn.Linear(w.shape[1], 3 * w.shape[0], bias=self.q.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts], 0))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts], 0))
        fused.requires_grad_(w.requires_grad)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def _blocks(vit: nn.Module) -> list[nn.Module]:
    blocks = getattr(vit, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks):
        raise TypeError(f"{type(vit).__name__} is not a timm ViT with blocks[i].attn.qkv; adapters need one")
    return list(blocks)


def add_adapters(vit: nn.Module, kind: str = "dora", rank: int = 64, alpha: float = 1.0,
                 dropout: float = 0.0) -> int:
    """Split every ``attn.qkv`` and inject peft adapters on q, v and ``attn.proj``, in place.

    Args:
        vit: a timm ``VisionTransformer`` (``backbone.model``).
        kind: ``"dora"`` (weight-decomposed LoRA, ``use_dora=True``) or ``"lora"``.
        rank: adapter rank r.
        alpha: ``lora_alpha`` (the update is scaled by alpha / r).
        dropout: adapter input dropout.

    Returns:
        The number of adapted Linear layers (3 per block).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # pragma: no cover - peft is in the train extra
        raise ImportError("AnomalyVFM adapters need peft: pip install 'edge-ad[train]' (or pip install peft)") from e
    if kind not in ("dora", "lora"):
        raise ValueError(f"adapter kind must be 'dora' or 'lora', got {kind!r}")
    blocks = _blocks(vit)
    for block in blocks:
        if not isinstance(block.attn.qkv, SplitQKV):
            block.attn.qkv = SplitQKV.from_fused(block.attn.qkv)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout),
                        target_modules=ADAPTER_TARGETS, use_dora=(kind == "dora"), bias="none")
    inject_adapter_in_model(config, vit)
    return 3 * len(blocks)


def _is_adapter_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def has_adapters(vit: nn.Module) -> bool:
    """True while ``vit`` holds peft adapter layers or split qkv projections."""
    for module in vit.modules():
        if isinstance(module, SplitQKV) or type(module).__module__.startswith("peft."):
            return True
    return False


def adapter_parameters(vit: nn.Module) -> int:
    """Number of adapter parameters (peft ``lora_*`` tensors, DoRA magnitudes included)."""
    return sum(p.numel() for n, p in vit.named_parameters() if "lora_" in n)


@torch.no_grad()
def merge_adapters(vit: nn.Module) -> int:
    """Fold every adapter into its base weight and restore plain fused ``attn.qkv``, in place.

    Uses peft's ``merge()`` (LoRA: ``W + (alpha / r) B A``; DoRA additionally rescales every row
    to its learned magnitude), then replaces each adapter layer by its base ``nn.Linear`` and each
    :class:`SplitQKV` by the fused ``Linear``. Afterwards ``vit`` is a plain timm ViT again (same
    keys as before :func:`add_adapters`) and computes what the adapted model computed.

    Returns:
        The number of layers merged.
    """
    merged = 0
    if any(type(m).__module__.startswith("peft.") for m in vit.modules()):
        targets = [(name, m) for name, m in vit.named_modules() if _is_adapter_layer(m)]
        for name, module in targets:
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = vit.get_submodule(parent_name) if parent_name else vit
            setattr(parent, child, module.get_base_layer())
            merged += 1
    for block in _blocks(vit):
        if isinstance(block.attn.qkv, SplitQKV):
            block.attn.qkv = block.attn.qkv.fuse()
    return merged
