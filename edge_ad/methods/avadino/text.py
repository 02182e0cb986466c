"""Prompt-ensemble text embeddings for AVA-DINO (training / conversion time only).

AVA-DINO compares image features with CLIP text embeddings of two prompt ensembles per class
name: "normal" (``"a photo of a flawless {name}."`` ...) and "abnormal" (``"a photo of a damaged
{name}."`` ...). Each sentence is encoded by a CLIP text encoder, L2-normalised, averaged over the
ensemble and L2-normalised again, giving one (2, D) tensor per class name: row 0 normal, row 1
abnormal, D the text-projection width (768 for CLIP ViT-L/14).

The text encoder never reaches a device: a detector stores the (2, D) embedding of its deployment
class name as a buffer (a constant of the exported graph). Embeddings come from either

* a local Hugging Face CLIP directory (``CLIPTextModelWithProjection`` / ``CLIPModel`` weights with
  its tokenizer files; ``local_files_only``: no download), or
* a precomputed embeddings file (``.safetensors`` with one (2, D) tensor per class name, written by
  :func:`save_text_embeddings`), so a run can be trained / converted without the text model.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

__all__ = [
    "PROMPT_ABNORMAL_STATES",
    "PROMPT_NORMAL_STATES",
    "PROMPT_TEMPLATES",
    "ClipTextEncoder",
    "TextEmbeddings",
    "load_text_embeddings",
    "prompt_sentences",
    "save_text_embeddings",
]

# The prompt ensemble of the reference code (the WinCLIP / AnomalyCLIP family): state phrases
# combined with photo templates, 7 x 35 normal and 5 x 35 abnormal sentences per class name.
PROMPT_NORMAL_STATES: tuple[str, ...] = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
PROMPT_ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage",
)
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.",
    "a photo of a large {}.", "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "there is a {} in the scene.", "there is the {} in the scene.",
    "this is a {} in the scene.", "this is the {} in the scene.", "this is one {} in the scene.",
)


def prompt_sentences(name: str) -> tuple[list[str], list[str]]:
    """The (normal, abnormal) sentence lists of the ensemble for one class name."""
    name = _check_name(name)
    normal = [t.format(s.format(name)) for s in PROMPT_NORMAL_STATES for t in PROMPT_TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in PROMPT_ABNORMAL_STATES for t in PROMPT_TEMPLATES]
    return normal, abnormal


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"class name must be a non-empty string, got {name!r}")
    return name.strip()


class ClipTextEncoder:
    """A CLIP text tower loaded from a local directory (``transformers``; no network access).

    Args:
        path: a directory holding a ``CLIPTextModelWithProjection`` or full ``CLIPModel``
            checkpoint (``config.json`` + weights) and its tokenizer files.
        device: where to run the encoder.
        batch_size: sentences per forward pass.

    Attributes:
        dim: width D of the projected text embeddings.
    """

    def __init__(self, path: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 64) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP text model directory {path} has no config.json: pass a local Hugging Face CLIP directory "
                "(save_pretrained of CLIPModel / CLIPTextModelWithProjection + tokenizer) or a precomputed "
                "embeddings file (text_embeddings=...)"
            )
        from transformers import AutoConfig, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if config.model_type == "clip":
            # A full CLIPModel directory: keep only the text tower and its projection.
            full = CLIPModel.from_pretrained(path, local_files_only=True)
            self.text_model, self.projection = full.text_model, full.text_projection
            text_config = config.text_config
        elif config.model_type == "clip_text_model":
            tower = CLIPTextModelWithProjection.from_pretrained(path, local_files_only=True)
            self.text_model, self.projection = tower.text_model, tower.text_projection
            text_config = config
        else:
            raise ValueError(f"{path} holds a {config.model_type!r} model; AVA-DINO needs a CLIP text encoder")
        self.text_model.eval().to(device)
        self.projection.eval().to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.dim = int(config.projection_dim)
        self.max_length = int(text_config.max_position_embeddings)

    @torch.no_grad()
    def encode_sentences(self, sentences: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings (len(sentences), D), float32 on the CPU."""
        out = []
        for i in range(0, len(sentences), self.batch_size):
            tokens = self.tokenizer(list(sentences[i : i + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            # CLIP's sentence embedding: the end-of-text token's state, projected.
            emb = self.projection(self.text_model(**tokens).pooler_output).float()
            out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        return torch.cat(out)

    def encode(self, name: str) -> torch.Tensor:
        """The (2, D) ensemble embedding of a class name: row 0 normal, row 1 abnormal, unit norm."""
        rows = []
        for sentences in prompt_sentences(name):
            mean = self.encode_sentences(sentences).mean(dim=0)
            rows.append(mean / mean.norm())
        return torch.stack(rows)


def save_text_embeddings(path: str | Path, embeddings: Mapping[str, torch.Tensor]) -> Path:
    """Write ``{class name: (2, D) tensor}`` to a ``.safetensors`` file (see :func:`load_text_embeddings`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not embeddings:
        raise ValueError("save_text_embeddings needs at least one class name")
    dims = {tuple(t.shape) for t in embeddings.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 2 or next(iter(dims))[0] != 2:
        raise ValueError(f"every embedding must be (2, D) with one D, got shapes {sorted(dims)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({_check_name(k): v.detach().float().cpu().contiguous() for k, v in embeddings.items()}, str(path),
              metadata={"format": "edge_ad.avadino.text_embeddings", "rows": "normal,abnormal"})
    return path


def load_text_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_text_embeddings`: ``{class name: (2, D) float32}``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text embeddings file {path} not found (write one with save_text_embeddings)")
    table = load_file(str(path))
    for name, t in table.items():
        if t.ndim != 2 or t.shape[0] != 2:
            raise ValueError(f"{path}: embedding of {name!r} must be (2, D) (normal, abnormal), got {tuple(t.shape)}")
    return {k: v.float() for k, v in table.items()}


class TextEmbeddings:
    """Class name -> (2, D) embedding, from a precomputed file and / or a local CLIP text model.

    Names found in the file are used as they are; other names are encoded with the text model
    (loaded on first need) and cached. With neither source holding a name, a clear error says what
    to pass.

    Args:
        text_model: local CLIP directory (see :class:`ClipTextEncoder`), or None.
        embeddings: ``.safetensors`` file from :func:`save_text_embeddings`, or None.
        dim: expected embedding width D (the detector's ``text_dim``); checked on every lookup.
    """

    def __init__(self, text_model: str | Path | None = None, embeddings: str | Path | None = None,
                 *, dim: int | None = None) -> None:
        if text_model is None and embeddings is None:
            raise ValueError(
                "AVA-DINO needs CLIP text embeddings: pass text_model=LOCAL_CLIP_DIR or embeddings=FILE.safetensors"
            )
        self.text_model = None if text_model is None else str(text_model)
        self.embeddings_file = None if embeddings is None else str(embeddings)
        self.dim = dim
        self._cache: dict[str, torch.Tensor] = load_text_embeddings(embeddings) if embeddings is not None else {}
        self._encoder: ClipTextEncoder | None = None

    def __call__(self, name: str) -> torch.Tensor:
        """(2, D) float32 embedding of ``name`` (row 0 normal, row 1 abnormal)."""
        name = _check_name(name)
        if name not in self._cache:
            if self.text_model is None:
                raise KeyError(
                    f"class name {name!r} is not in the embeddings file {self.embeddings_file} "
                    f"(it has {sorted(self._cache)}); add it with save_text_embeddings or pass text_model=LOCAL_CLIP_DIR"
                )
            if self._encoder is None:
                self._encoder = ClipTextEncoder(self.text_model)
            self._cache[name] = self._encoder.encode(name)
        emb = self._cache[name]
        if self.dim is not None and emb.shape[1] != self.dim:
            raise ValueError(
                f"text embedding of {name!r} is {emb.shape[1]}-d but the detector's text_dim is {self.dim}; "
                "use the CLIP text model the run was trained with"
            )
        return emb

    def stack(self, names: Iterable[str]) -> torch.Tensor:
        """(len(names), 2, D) embeddings."""
        return torch.stack([self(n) for n in names])
