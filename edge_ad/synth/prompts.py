"""Prompt lists for generator-made anomaly data: objects x backgrounds (normals), damages (defects).

Stage (a) of :mod:`edge_ad.synth.diffusion` renders one normal image per ``(object, background)``
prompt; stage (b) inpaints a box with an object-specific damage prompt. The defaults cover common
industrial parts; pass your own :class:`PromptSet` (or a YAML / JSON file with the same keys) to
target a domain.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_BACKGROUNDS", "DEFAULT_DAMAGES", "DEFAULT_OBJECTS", "GENERIC_DAMAGES", "PromptSet"]

DEFAULT_OBJECTS: tuple[str, ...] = (
    "metal screw", "hex nut", "ceramic tile", "wooden board", "leather swatch", "woven fabric", "pill",
    "capsule", "transistor", "printed circuit board", "plastic bottle cap", "glass bottle", "hazelnut",
    "metal washer", "rubber gasket", "cable cross-section", "zipper", "toothbrush head", "carpet sample",
    "aluminium casting",
)

DEFAULT_BACKGROUNDS: tuple[str, ...] = (
    "on a plain black background", "on a white conveyor belt", "on a grey metal table",
    "on a matte blue background", "under diffuse studio lighting on a white background",
)

#: Damage prompts for any object; used when an object has no specific list.
GENERIC_DAMAGES: tuple[str, ...] = (
    "a deep scratch", "a crack", "a dent", "a stain", "a hole", "a missing piece", "contamination",
    "a burn mark", "a discoloured spot",
)

DEFAULT_DAMAGES: dict[str, tuple[str, ...]] = {
    "metal screw": ("a bent thread", "a scratched head", "rust", "a chipped tip"),
    "hex nut": ("a crushed edge", "rust", "a deep scratch", "a crack"),
    "ceramic tile": ("a crack", "a chipped corner", "a glaze bubble", "a stain"),
    "wooden board": ("a knot hole", "a crack", "a paint drop", "a burn mark"),
    "leather swatch": ("a cut", "a fold", "a colour stain", "a poke hole"),
    "woven fabric": ("a tear", "a pulled thread", "an oil stain", "a hole"),
    "pill": ("a crack", "a contamination speck", "a missing chunk", "a colour spot"),
    "capsule": ("a squeeze dent", "a crack", "a faulty imprint", "a poke"),
    "transistor": ("a bent lead", "a cut lead", "a damaged case", "a burn mark"),
    "printed circuit board": ("a missing component", "a solder bridge", "a scratch", "a burnt trace"),
    "glass bottle": ("a broken rim", "a contamination", "a crack", "a chip"),
    "hazelnut": ("a crack", "a hole", "a cut", "a print on the shell"),
    "metal washer": ("a bent edge", "rust", "a notch", "a scratch"),
    "cable cross-section": ("a missing wire", "a poke in the insulation", "a cut strand", "a swapped wire"),
    "zipper": ("a broken tooth", "a fabric tear", "a squeezed tooth", "a rough edge"),
}


@dataclass
class PromptSet:
    """Objects, backgrounds and damage prompts.

    Attributes:
        objects: object names (each becomes one MVTec-layout category folder, spaces -> ``_``).
        backgrounds: scene phrases appended to the normal prompt.
        damages: object -> damage phrases; objects not listed use ``generic_damages``.
        generic_damages: fallback damage phrases.
        normal_template: ``{object}`` / ``{background}`` format of the stage (a) prompt.
        damage_template: ``{object}`` / ``{damage}`` format of the stage (b) prompt.
    """

    objects: tuple[str, ...] = DEFAULT_OBJECTS
    backgrounds: tuple[str, ...] = DEFAULT_BACKGROUNDS
    damages: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_DAMAGES))
    generic_damages: tuple[str, ...] = GENERIC_DAMAGES
    normal_template: str = "a high-resolution photo of a flawless {object} {background}, industrial inspection"
    damage_template: str = "{damage} on a {object}, close-up photo"

    def __post_init__(self) -> None:
        self.objects = tuple(str(o) for o in self.objects)
        self.backgrounds = tuple(str(b) for b in self.backgrounds)
        self.generic_damages = tuple(str(d) for d in self.generic_damages)
        self.damages = {str(k): tuple(str(d) for d in v) for k, v in dict(self.damages).items()}
        if not self.objects or not self.backgrounds or not self.generic_damages:
            raise ValueError("a PromptSet needs at least one object, one background and one generic damage")
        names = [self.folder(o) for o in self.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"object names must map to distinct folders, got {names}")

    @staticmethod
    def folder(obj: str) -> str:
        """The category folder name of an object (spaces and slashes -> ``_``)."""
        return "_".join(obj.replace("/", " ").split())

    def normal_prompt(self, obj: str, rng: np.random.Generator) -> tuple[str, str]:
        """(prompt, background) of a normal image of ``obj``, background drawn from ``rng``."""
        background = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        return self.normal_template.format(object=obj, background=background), background

    def damage_prompt(self, obj: str, rng: np.random.Generator) -> tuple[str, str]:
        """(prompt, damage) for inpainting a defect on ``obj``, damage drawn from ``rng``."""
        choices = self.damages.get(obj) or self.generic_damages
        damage = choices[int(rng.integers(len(choices)))]
        return self.damage_template.format(object=obj, damage=damage), damage

    def to_dict(self) -> dict[str, Any]:
        return {
            "objects": list(self.objects), "backgrounds": list(self.backgrounds),
            "damages": {k: list(v) for k, v in self.damages.items()},
            "generic_damages": list(self.generic_damages),
            "normal_template": self.normal_template, "damage_template": self.damage_template,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> "PromptSet":
        """Read a YAML (``.yaml`` / ``.yml``) or JSON file with :meth:`to_dict`'s keys (all optional)."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
        if not isinstance(doc, dict):
            raise ValueError(f"{path} must hold a mapping with objects / backgrounds / damages")
        known = set(cls().to_dict())
        unknown = set(doc) - known
        if unknown:
            raise ValueError(f"{path}: unknown prompt keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**doc)
