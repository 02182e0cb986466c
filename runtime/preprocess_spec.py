"""``PreprocessSpec``: how a camera frame becomes a model input. One spec per bundle / run."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

RESIZE_MODES = ("auto", "bilinear", "area")
#: What a spec that does not name its resize mode uses: antialiased when downscaling.
DEFAULT_RESIZE = "auto"


def effective_resize(mode: str, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> str:
    """The concrete mode (``"bilinear"`` or ``"area"``) ``mode`` means for one frame size.

    ``"auto"`` is ``"area"`` when neither axis upscales (``src >= dst`` on both), else
    ``"bilinear"``; the other modes are returned unchanged. Sizes are (height, width) in pixels.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    down = src_hw[0] >= dst_hw[0] and src_hw[1] >= dst_hw[1]
    return "area" if down else "bilinear"


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize and normalisation of uint8 frames into float NCHW RGB model input.

    Attributes:
        height, width: model input size in pixels.
        mean, std: RGB normalisation applied to pixels scaled to 0..1: ``(p / 255 - mean) / std``.
        resize: ``"auto"`` (default: ``"area"`` when neither axis upscales, else ``"bilinear"``,
            decided per frame), ``"bilinear"`` (half-pixel centres, no antialias: OpenCV
            INTER_LINEAR) or ``"area"`` (pixel-area averaging: OpenCV INTER_AREA). Bilinear
            aliases when a large frame is shrunk several times (fine texture turns into moire that
            looks like a defect); area averaging does not.
    """

    height: int
    width: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    resize: str = DEFAULT_RESIZE

    def __post_init__(self) -> None:
        if int(self.height) <= 0 or int(self.width) <= 0:
            raise ValueError(f"input size must be positive, got {self.height}x{self.width}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std must have three (RGB) values each")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be positive, got {self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return int(self.height), int(self.width)

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict for YAML manifests / configs."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessSpec":
        """Inverse of :meth:`to_dict`; unknown keys are an error, so typos cannot pass silently."""
        known = {"height", "width", "mean", "std", "resize"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PreprocessSpec keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**{k: (tuple(v) if k in ("mean", "std") else v) for k, v in d.items()})
