"""CLIP text tower of an OpenAI / open_clip or transformers checkpoint -> a transformers
``CLIPTextModelWithProjection`` folder (``config.json`` + ``model.safetensors``).

AVA-DINO encodes its prompt ensembles with ``edge_ad.methods.avadino.text.ClipTextEncoder``, which
reads such a folder (plus the tokenizer files). Users holding OpenAI's ``ViT-L-14-336px.pt`` (a
TorchScript archive) or an open_clip ``open_clip_pytorch_model.bin`` convert it here; a
transformers ``CLIPModel`` snapshot is reduced to its text tower.

OpenAI key names (openai/CLIP clip/model.py, ``CLIP``): ``token_embedding.weight`` (V, D),
``positional_embedding`` (T, D), ``transformer.resblocks.N.{attn.in_proj_weight, attn.in_proj_bias,
attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj, ln_2}``, ``ln_final``, ``text_projection`` (D, E) used as
``x @ text_projection``; heads = D / 64, QuickGELU, causal mask, sentence embedding at the
end-of-text token (the largest token id).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .layouts import normalise_transformers_keys
from .weights import IncompatibleWeightsError, StateDict, WeightsPath, read_weights

#: Tokenizer files of a Hugging Face CLIP repository that ``ClipTextEncoder`` needs.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def openai_text_to_transformers(state_dict: StateDict) -> tuple[StateDict, dict]:
    """OpenAI / open_clip text-tower keys -> ``CLIPTextModelWithProjection`` keys and its config.

    Raises:
        IncompatibleWeightsError: the state dict has no OpenAI text tower.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    if "token_embedding.weight" not in sd or "text_projection" not in sd:
        raise IncompatibleWeightsError(
            "no OpenAI / open_clip text tower (token_embedding.weight, text_projection) in the checkpoint"
        )
    vocab, width = (int(n) for n in sd["token_embedding.weight"].shape)
    depth = max(int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))) + 1
    out: StateDict = {
        "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "text_model.final_layer_norm.weight": sd["ln_final.weight"],
        "text_model.final_layer_norm.bias": sd["ln_final.bias"],
        "text_projection.weight": sd["text_projection"].t().contiguous(),  # x @ P  ==  Linear(P^T)
    }
    for i in range(depth):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for name, weight, bias in zip("qkv", sd[src + "attn.in_proj_weight"].chunk(3), sd[src + "attn.in_proj_bias"].chunk(3)):
            out[f"{dst}self_attn.{name}_proj.weight"], out[f"{dst}self_attn.{name}_proj.bias"] = weight, bias
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
    config = {
        "model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"],
        "vocab_size": vocab, "hidden_size": width, "num_hidden_layers": depth,
        "num_attention_heads": width // 64,  # OpenAI: transformer_heads = transformer_width // 64
        "intermediate_size": int(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "max_position_embeddings": int(sd["positional_embedding"].shape[0]),
        "projection_dim": int(sd["text_projection"].shape[1]), "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        # The end-of-text token is the vocabulary's last id (49407 for OpenAI's BPE); transformers
        # pools the sentence embedding at its first occurrence.
        "bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1,
    }
    return {k: v.contiguous() for k, v in out.items()}, config


def convert_clip_text(path: WeightsPath, out: WeightsPath, *, tokenizer_from: WeightsPath | None = None) -> Path:
    """Write the CLIP text tower of ``path`` as a ``CLIPTextModelWithProjection`` folder.

    Args:
        path: OpenAI ``.pt`` (TorchScript) / open_clip file with a text tower, or a transformers
            ``CLIPModel`` / ``CLIPTextModelWithProjection`` snapshot folder.
        out: folder to write ``config.json`` + ``model.safetensors`` into (created).
        tokenizer_from: folder holding the tokenizer files (a Hugging Face CLIP snapshot); the
            ones present of ``TOKENIZER_FILES`` are copied so ``ClipTextEncoder(out)`` works.

    Returns:
        ``out`` as a Path.
    """
    from safetensors.torch import save_file

    read = read_weights(path)
    if any(k.startswith(("token_embedding.", "module.token_embedding.")) for k in read.state_dict):
        tensors, config = openai_text_to_transformers(read.state_dict)
    else:
        sd = normalise_transformers_keys(read.state_dict) if "text_model.embeddings.token_embedding.weight" \
            not in read.state_dict else read.state_dict
        tensors = {k: v.contiguous() for k, v in sd.items() if k.startswith(("text_model.", "text_projection."))}
        if "text_projection.weight" not in tensors:
            raise IncompatibleWeightsError(
                f"{path} holds no CLIP text tower with projection (text_model.*, text_projection.weight)")
        tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
        config = dict((read.config or {}).get("text_config", read.config or {}))
        config.update({"model_type": "clip_text_model", "architectures": ["CLIPTextModelWithProjection"]})
        if read.config and "projection_dim" in read.config:
            config["projection_dim"] = read.config["projection_dim"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, out / name)
    return out


__all__ = ["TOKENIZER_FILES", "convert_clip_text", "openai_text_to_transformers"]
