"""Calibration sets: the images INT8 quantisers (NNCF / OpenVINO, TensorRT Q/DQ) measure
activation ranges on.

A calibration set is built from *good* images of the line, never from test data:

1. **Candidates**: a folder of good images, the ``train/good`` split of an MVTec-layout category
   (a test split or anything labelled anomalous is refused), evenly spaced frames of a video file,
   or a list of uint8 frames; at most ``max_candidates`` (evenly spaced, deterministic).
2. **Selection**: ``count - round(count * synthetic_fraction)`` good images chosen by greedy
   k-center (farthest-point) selection on a cheap descriptor: each frame area-resized to
   16 x 16 RGB in 0..1 (no per-image normalisation, so lighting changes count as diversity), or
   the features of ``feature_fn``. k-center minimises the largest distance from any candidate
   to its nearest chosen image, so rare-but-normal conditions (a shifted part, a darker shift)
   are represented instead of N near-duplicate frames of the most common state. The first pick is
   the candidate nearest to the mean descriptor; ties break towards the lower index: the result
   depends on the candidates alone, not on the seed. Caveat: farthest-point picks outliers
   early, so a corrupt frame or a mislabelled defect among the "good" images will be chosen:
   keep the source clean.
3. **Synthetic anomalies** (``synthetic_fraction``): chosen good images (a seeded permutation,
   cycled) altered with CutPaste (:mod:`edge_ad.synth`), a scratch (thin dark / bright curved
   strokes) or a noise blob, cycling through the three, so activation ranges also cover defect
   responses. Item j draws from its own generator ``default_rng([seed, j])``.
   Source frames are decoded in chunks of 32 (one sequential pass for a video), so memory stays
   bounded by the output tensor, not by the source resolution times N.
4. Everything goes through :func:`edge_ad.runtime.preprocessing.preprocess_batch` with the
   detector's spec: :attr:`CalibrationSet.images` is exactly what the model sees on the device.

The set records its file list, per-item kind (``"good"`` / ``"synthetic"``) and variant, and a
sha256 over the preprocessed tensor bytes plus the spec (:attr:`CalibrationSet.hash`) so a bundle
can name the exact data its INT8 ranges came from. torch-free (``feature_fn`` may use torch).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_ad.runtime.image_io import is_image_file
from edge_ad.runtime.preprocess_spec import PreprocessSpec
from edge_ad.runtime.preprocessing import preprocess_batch

__all__ = [
    "DEFAULT_SYNTHETIC_FRACTION",
    "SYNTHETIC_VARIANTS",
    "VIDEO_SUFFIXES",
    "CalibrationSet",
    "TestSplitError",
    "build_calibration_set",
    "content_hash",
    "image_descriptors",
    "k_center_greedy",
    "noise_blob",
    "scratch",
]

#: Default share of synthetic anomalies in a calibration set, set by measurement: OpenVINO INT8 of
#: the four demo runs (FoundAD / knn x hazelnut / magnetic tile, EfficientNet-Lite0), fidelity on
#: the test splits (`benchmarks/int8_fidelity.py --synthetic-fraction 0` vs the default). Where
#: INT8 cost pixel AUROC (magnetic tile) mixed calibration cost less (-0.06 vs -0.25 points FoundAD,
#: -0.39 vs -0.45 knn); on hazelnut both moved up slightly (+0.08 / +0.07 mixed, +0.02 / +0.04
#: normal-only); the map Pearson r against FP32 was higher with mixed calibration on all four runs
#: (e.g. 0.9930 vs 0.9895).
DEFAULT_SYNTHETIC_FRACTION = 0.25
SYNTHETIC_VARIANTS = ("cutpaste", "scratch", "noise")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".h264", ".264")
_DESCRIPTOR_SPEC = PreprocessSpec(16, 16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="area")
_CALIB_NPZ, _CALIB_JSON = "calibration.npz", "calibration.json"


class TestSplitError(ValueError):
    """The source is test data (or holds anomalous images): calibrating on it would leak the test set."""

    __test__ = False  # not a pytest test class despite the name


# ------------------------------------------------------------------------------------------------
# The set
# ------------------------------------------------------------------------------------------------


@dataclass
class CalibrationSet:
    """Preprocessed calibration images with their provenance.

    Attributes:
        images: float32 (N, 3, H, W), normalised with ``spec`` (the model input).
        masks: bool (N, H, W) at the input size: pixels the synthetic defect touches (area resize > 0;
            all False for good images).
        spec: the preprocessing used.
        files: N source names (image path, ``<video>#frame=<i>``, ``array[<i>]``; synthetic items
            ``synthetic:<variant>:<base name>``).
        kinds: N of ``"good"`` / ``"synthetic"``.
        variants: N of ``"good"`` or the synthetic variant (``"cutpaste-normal"``,
            ``"cutpaste-scar"``, ``"scratch"``, ``"noise"``).
        synthetic_fraction: requested share of synthetic images.
        seed: seed of the synthetic anomalies.
        hash: sha256 hex of the spec (JSON) and the images' shape, dtype and bytes.
        source: description of the source.
        selection: how the good images were chosen.
        num_candidates: good candidates the selection saw.
    """

    images: np.ndarray
    masks: np.ndarray
    spec: PreprocessSpec
    files: list[str]
    kinds: list[str]
    variants: list[str]
    synthetic_fraction: float
    seed: int
    hash: str
    source: str = ""
    selection: str = ""
    num_candidates: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def count(self) -> int:
        return len(self)

    @property
    def num_synthetic(self) -> int:
        return sum(k == "synthetic" for k in self.kinds)

    def batches(self, batch_size: int = 8) -> Iterator[np.ndarray]:
        """float32 (b, 3, H, W) views of :attr:`images`, b <= ``batch_size``, in order."""
        for start in range(0, len(self), int(batch_size)):
            yield self.images[start:start + int(batch_size)]

    def to_manifest(self) -> dict[str, Any]:
        """Plain-type summary for bundle manifests / logs (no pixel data)."""
        return {
            "count": len(self),
            "hash": self.hash,
            "num_good": len(self) - self.num_synthetic,
            "num_synthetic": self.num_synthetic,
            "synthetic_fraction": float(self.synthetic_fraction),
            "seed": int(self.seed),
            "files": list(self.files),
            "kinds": list(self.kinds),
            "variants": list(self.variants),
            "source": self.source,
            "selection": self.selection,
            "num_candidates": int(self.num_candidates),
            "preprocess": self.spec.to_dict(),
        }

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``calibration.npz`` (images, masks) and ``calibration.json`` (manifest) to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / _CALIB_NPZ, images=self.images, masks=self.masks)
        manifest = self.to_manifest()
        manifest["extra"] = self.extra
        (folder / _CALIB_JSON).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> "CalibrationSet":
        """Read a set written by :meth:`save`; the hash is recomputed and must match the manifest."""
        folder = Path(folder)
        manifest = json.loads((folder / _CALIB_JSON).read_text(encoding="utf-8"))
        with np.load(folder / _CALIB_NPZ) as data:
            images, masks = data["images"], data["masks"]
        spec = PreprocessSpec.from_dict(manifest["preprocess"])
        digest = content_hash(images, spec)
        if digest != manifest["hash"]:
            raise ValueError(f"{folder}: calibration images do not match the manifest hash (files edited or mixed)")
        return cls(images=images, masks=masks, spec=spec, files=manifest["files"], kinds=manifest["kinds"],
                   variants=manifest["variants"], synthetic_fraction=manifest["synthetic_fraction"],
                   seed=manifest["seed"], hash=digest, source=manifest.get("source", ""),
                   selection=manifest.get("selection", ""), num_candidates=manifest.get("num_candidates", 0),
                   extra=manifest.get("extra", {}))

    def __repr__(self) -> str:
        return (f"CalibrationSet({len(self)} images ({self.num_synthetic} synthetic) at "
                f"{self.spec.height}x{self.spec.width}, hash {self.hash[:12]}, source {self.source!r})")


def content_hash(images: np.ndarray, spec: PreprocessSpec) -> str:
    """sha256 hex of ``spec`` (sorted JSON) and ``images``' shape, dtype and C-order bytes."""
    arr = np.ascontiguousarray(images)
    h = hashlib.sha256()
    h.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    h.update(json.dumps({"shape": list(arr.shape), "dtype": str(arr.dtype)}).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def image_descriptors(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Cheap appearance descriptors: each uint8 RGB frame area-resized to 16 x 16, values 0..1.

    Returns:
        float32 (N, 768).
    """
    out = preprocess_batch(list(frames), _DESCRIPTOR_SPEC, color_order="rgb")
    return out.reshape(len(out), -1)


def k_center_greedy(features: np.ndarray, k: int) -> np.ndarray:
    """Greedy k-center (farthest-point) selection.

    Starts at the row nearest to the mean, then repeatedly adds the row farthest (Euclidean) from
    everything chosen so far; a 2-approximation of the smallest covering radius. Deterministic:
    ties go to the lowest index; duplicates are picked only once all distinct rows are.

    Args:
        features: (N, D) float rows.
        k: how many to pick (clipped to N).

    Returns:
        int64 (min(k, N),) row indices in pick order.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    n = len(x)
    k = min(int(k), n)
    if k <= 0:
        return np.zeros(0, np.int64)
    sq = (x * x).sum(axis=1)

    def dist2(i: int) -> np.ndarray:
        return np.maximum(sq - 2.0 * (x @ x[i]) + sq[i], 0.0)

    centre = x.mean(axis=0)
    first = int(np.argmin(((x - centre) ** 2).sum(axis=1)))
    chosen = [first]
    d = dist2(first)
    d[first] = -1.0
    for _ in range(k - 1):
        i = int(np.argmax(d))
        chosen.append(i)
        d = np.minimum(d, dist2(i))
        d[chosen] = -1.0
    return np.asarray(chosen, np.int64)


# ------------------------------------------------------------------------------------------------
# Synthetic defects beyond CutPaste
# ------------------------------------------------------------------------------------------------


def _is_grey(image: np.ndarray) -> bool:
    return bool((image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all())


def _fg_point(fg: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(fg)
    i = int(rng.integers(len(ys)))
    return float(ys[i]), float(xs[i])


def scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1-3 thin curved strokes (quadratic Bézier), dark or bright, clipped to the foreground
    (:func:`edge_ad.synth.foreground_mask`); grey images get grey strokes.

    Args:
        image: uint8 (H, W, 3) RGB.
        rng: the random source.

    Returns:
        (uint8 (H, W, 3) new image, bool (H, W) mask of changed pixels).
    """
    from edge_ad.synth import foreground_mask

    h, w = image.shape[:2]
    fg = foreground_mask(image)
    scale = min(h, w) / 256.0
    grey = _is_grey(image)
    out = image.copy()
    painted = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        y0, x0 = _fg_point(fg, rng)
        angle = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.1, 0.35) * min(h, w)
        y2, x2 = y0 + length * math.sin(angle), x0 + length * math.cos(angle)
        bend = rng.uniform(-0.25, 0.25) * length
        yc, xc = (y0 + y2) / 2 + bend * math.cos(angle), (x0 + x2) / 2 - bend * math.sin(angle)
        radius = max(0.5, rng.uniform(0.5, 1.5) * scale)
        t = np.linspace(0.0, 1.0, max(2, int(2 * length)))[:, None]
        pts = (1 - t) ** 2 * np.array([y0, x0]) + 2 * (1 - t) * t * np.array([yc, xc]) + t ** 2 * np.array([y2, x2])
        stroke = np.zeros((h, w), bool)
        r = int(math.ceil(radius))
        for py, px in pts:
            iy, ix = int(round(py)), int(round(px))
            y_lo, y_hi, x_lo, x_hi = max(0, iy - r), min(h, iy + r + 1), max(0, ix - r), min(w, ix + r + 1)
            if y_lo >= y_hi or x_lo >= x_hi:
                continue
            ys, xs = np.ogrid[y_lo:y_hi, x_lo:x_hi]
            near = (ys - py) ** 2 + (xs - px) ** 2 <= radius ** 2
            stroke[y_lo:y_hi, x_lo:x_hi] |= near
        stroke &= fg  # scratches are on the part, not on the background
        dark = rng.random() < 0.5
        level = rng.uniform(0, 40) if dark else rng.uniform(215, 255)
        colour = np.clip(level + rng.normal(0, 10, size=3), 0, 255)
        if grey:
            colour[:] = colour.mean()
        out[stroke] = np.rint(colour).astype(np.uint8)
        painted |= stroke
    return out, painted & (out != image).any(axis=-1)


def noise_blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical patch (1-5 % of the image area) with strong Gaussian noise (sigma 30-80 grey
    levels; grey images get grey noise), centred on the foreground.

    Returns:
        (uint8 (H, W, 3) new image, bool (H, W) mask of changed pixels).
    """
    from edge_ad.synth import foreground_mask

    h, w = image.shape[:2]
    fg = foreground_mask(image)
    cy, cx = _fg_point(fg, rng)
    area = rng.uniform(0.01, 0.05) * h * w
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    ry, rx = math.sqrt(area / (math.pi * aspect)), math.sqrt(area * aspect / math.pi)
    yy, xx = np.ogrid[0:h, 0:w]
    blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    noise = rng.normal(0.0, rng.uniform(30, 80), size=(int(blob.sum()), 3))
    if _is_grey(image):
        noise[:, 1:] = noise[:, :1]  # grey stays grey
    out = image.copy()
    out[blob] = np.clip(out[blob].astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return out, blob & (out != image).any(axis=-1)


def _mask_to_input(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """bool (H, W) at source size -> bool at the input size, True where any covered source pixel
    is set (area resize > 0): a 1-pixel scratch stays visible after a 5x downscale, where nearest
    neighbour would drop it."""
    grey = np.ascontiguousarray(mask.astype(np.uint8) * 255)
    area = PreprocessSpec(spec.height, spec.width, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="area")
    return preprocess_batch([grey], area, color_order="gray")[0, 0] > 0


def _synthesise(image: np.ndarray, variant: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    if variant == "cutpaste":
        from edge_ad.synth import cutpaste

        res = cutpaste(image, rng)
        return res.image, res.mask, f"cutpaste-{res.variant}"
    if variant == "scratch":
        return (*scratch(image, rng), "scratch")
    return (*noise_blob(image, rng), "noise")


# ------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------


def _to_rgb(frame: np.ndarray, color_order: str, where: str) -> np.ndarray:
    a = np.asarray(frame)
    if a.dtype != np.uint8:
        raise TypeError(f"{where} must be uint8 (a camera frame / decoded image), got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{where} must be (H, W), (H, W, 1) or (H, W, 3), got shape {a.shape}")
    return np.ascontiguousarray(a[..., ::-1] if color_order == "bgr" else a)


class _Source:
    """Candidate frames by index: ``names[i]`` and uint8 RGB frames, streamed in bounded chunks."""

    description: str
    names: list[str]

    def load(self, indices: Sequence[int]) -> list[np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def stream(self, indices: Sequence[int], chunk: int) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """``(positions, frames)`` chunks covering ``indices`` once: ``frames[j]`` is source item
        ``indices[positions[j]]``. At most ``chunk`` decoded frames are held at a time."""
        for start in range(0, len(indices), chunk):
            positions = list(range(start, min(len(indices), start + chunk)))
            yield positions, self.load([indices[p] for p in positions])


class _ArraySource(_Source):
    def __init__(self, frames: Sequence[np.ndarray], color_order: str) -> None:
        self.frames = [_to_rgb(f, color_order, f"frames[{i}]") for i, f in enumerate(frames)]
        self.names = [f"array[{i}]" for i in range(len(self.frames))]
        self.description = f"{len(self.frames)} in-memory frames"

    def load(self, indices: Sequence[int]) -> list[np.ndarray]:
        return [self.frames[i] for i in indices]


class _DatasetSource(_Source):
    def __init__(self, dataset: Any, description: str) -> None:
        self.dataset = dataset
        self.names = [str(p) for p in dataset.paths] if hasattr(dataset, "paths") else [
            f"item[{i}]" for i in range(len(dataset))]
        self.description = description

    def load(self, indices: Sequence[int]) -> list[np.ndarray]:
        return [self.dataset[int(i)].image for i in indices]


class _VideoSource(_Source):
    """Evenly spaced frames of a video (decoded sequentially: seeking is unreliable in many codecs)."""

    def __init__(self, path: Path, max_frames: int) -> None:
        from edge_ad.runtime import require_cv2

        self.cv2 = require_cv2("read calibration frames from a video")
        self.path = path
        total = self._frame_count()
        if total == 0:
            raise ValueError(f"no frames could be decoded from {path}: corrupt file or codec missing in this OpenCV")
        m = min(total, max_frames)
        self.frame_ids = sorted({int(round(i * (total - 1) / max(1, m - 1))) for i in range(m)}) if m > 1 else [0]
        self.names = [f"{path}#frame={i}" for i in self.frame_ids]
        self.description = f"video {path} ({total} frames, {len(self.frame_ids)} sampled evenly)"

    def _open(self) -> Any:
        cap = self.cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise ValueError(f"cannot open video {self.path}: not a video file or its codec is missing in this OpenCV")
        return cap

    def _frame_count(self) -> int:
        cap = self._open()
        n = 0
        try:  # count by grabbing: CAP_PROP_FRAME_COUNT is an estimate for many containers
            while cap.grab():
                n += 1
        finally:
            cap.release()
        return n

    def stream(self, indices: Sequence[int], chunk: int) -> Iterator[tuple[list[int], list[np.ndarray]]]:
        """One sequential decoding pass for all ``indices`` (in frame order), ``chunk`` frames at a time."""
        wanted: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            wanted.setdefault(self.frame_ids[i], []).append(pos)
        if not wanted:
            return
        last = max(wanted)
        positions: list[int] = []
        frames: list[np.ndarray] = []
        found = 0
        cap = self._open()
        try:
            frame_no = 0
            while frame_no <= last and cap.grab():
                if frame_no in wanted:
                    ok, frame = cap.retrieve()
                    if not ok:
                        raise ValueError(f"cannot decode frame {frame_no} of {self.path}")
                    rgb = _to_rgb(frame, "bgr", f"{self.path}#frame={frame_no}")
                    for pos in wanted[frame_no]:
                        positions.append(pos)
                        frames.append(rgb)
                    found += 1
                    if len(frames) >= chunk:
                        yield positions, frames
                        positions, frames = [], []
                frame_no += 1
        finally:
            cap.release()
        if found < len(wanted):
            raise ValueError(f"{self.path} ended before the sampled frames could be read (truncated file?)")
        if frames:
            yield positions, frames

    def load(self, indices: Sequence[int]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(indices)
        for positions, frames in self.stream(indices, max(1, len(indices))):
            for pos, frame in zip(positions, frames):
                out[pos] = frame
        return out  # type: ignore[return-value]


def _refuse_test_dataset(dataset: Any) -> None:
    node = dataset
    while node is not None:
        if getattr(node, "split", None) == "test":
            raise TestSplitError(
                "refusing to calibrate on a test split: calibration must never see test data (the quantised "
                "model would be tuned on the images it is judged on). Use the train/good split or a folder of "
                "good images from the line"
            )
        node = getattr(node, "parent", None)
    labels = getattr(dataset, "labels", None)
    if labels is not None and np.asarray(labels).any():
        raise TestSplitError(
            f"the calibration source holds {int(np.asarray(labels).sum())} anomalous image(s): calibration sets "
            "are built from good images (synthetic defects are added by synthetic_fraction)"
        )


def _refuse_test_path(path: Path) -> None:
    resolved = path.resolve()
    parts = resolved.parts
    for i, part in enumerate(parts):
        if part in ("test", "ground_truth"):
            category = Path(*parts[:i]) if i else Path(parts[0])
            if (category / "train").is_dir() or (category / "ground_truth").is_dir() or part == "ground_truth":
                raise TestSplitError(
                    f"refusing to calibrate on {path}: it is inside the {part!r} split of the MVTec-layout "
                    f"category {category}. Calibration must never see test data; pass the category folder "
                    f"({category}, its train/good images are used) or {category / 'train' / 'good'}"
                )


def _path_source(path: Path, max_candidates: int) -> _Source:
    from edge_ad.data import FolderDataset, MVTecDataset

    if not path.exists():
        raise FileNotFoundError(f"calibration source not found: {path}")
    _refuse_test_path(path)
    if path.is_file():
        if is_image_file(path):
            raise ValueError(f"{path} is a single image: pass its folder, or a list of frames")
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            warnings.warn(f"{path} has no known video suffix {VIDEO_SUFFIXES}; trying to open it as a video",
                          stacklevel=3)
        return _VideoSource(path, max_candidates)
    if (path / "train" / "good").is_dir():
        ds = MVTecDataset(path.parent, path.name, "train")
        return _DatasetSource(ds, f"MVTec category {path} (train/good)")
    if path.name == "train" and (path / "good").is_dir():
        return _DatasetSource(FolderDataset(path / "good"), f"folder {path / 'good'}")
    return _DatasetSource(FolderDataset(path), f"folder {path}")


def _make_source(source: Any, color_order: str, max_candidates: int) -> _Source:
    if isinstance(source, (str, os.PathLike)):
        return _path_source(Path(source).expanduser(), max_candidates)
    if isinstance(source, np.ndarray):
        if source.ndim in (3, 4) and source.dtype == np.uint8:
            return _ArraySource(list(source), color_order)
        raise TypeError(f"an array source must be uint8 (N, H, W[, C]) frames, got {source.dtype} {source.shape}")
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        if len(source) and isinstance(source[0], np.ndarray):
            return _ArraySource(list(source), color_order)
        if len(source) and hasattr(source[0], "image"):
            _refuse_test_dataset(source)
            return _DatasetSource(source, repr(source))
        if len(source) == 0:
            raise ValueError("the calibration source is empty")
    raise TypeError(
        "source must be a folder of good images, an MVTec-layout category folder, a video file, a dataset of "
        f"good samples or a list of uint8 frames; got {type(source).__name__}"
    )


# ------------------------------------------------------------------------------------------------
# Builder
# ------------------------------------------------------------------------------------------------


def _features(
    src: _Source, candidates: np.ndarray, spec: PreprocessSpec, feature_fn: Callable[[np.ndarray], Any] | None,
    chunk: int,
) -> np.ndarray:
    """(len(candidates), D) float64 selection descriptors, one streaming pass over the source."""
    feats: np.ndarray | None = None
    for positions, frames in src.stream(candidates.tolist(), chunk):
        if feature_fn is None:
            f = image_descriptors(frames)
        else:
            out = feature_fn(preprocess_batch(frames, spec, color_order="rgb"))
            if hasattr(out, "detach"):  # a torch tensor
                out = out.detach().cpu().numpy()
            f = np.asarray(out, dtype=np.float64).reshape(len(frames), -1)
        if feats is None:
            feats = np.empty((len(candidates), f.shape[1]), np.float64)
        feats[positions] = f
    assert feats is not None
    return feats


def build_calibration_set(
    source: Any,
    spec: PreprocessSpec,
    *,
    count: int = 128,
    synthetic_fraction: float = DEFAULT_SYNTHETIC_FRACTION,
    seed: int = 0,
    min_count: int = 32,
    feature_fn: Callable[[np.ndarray], Any] | None = None,
    color_order: str = "rgb",
    max_candidates: int = 2048,
) -> CalibrationSet:
    """Choose representative, diverse good images (plus synthetic defects) for INT8 calibration.

    Args:
        source: where the good images come from:
            * a folder of good images (non-recursive), or ``<category>/train`` with ``good/`` inside;
            * an MVTec-layout category folder (``<root>/<category>``): its ``train/good`` only;
            * a video file (``.mp4``, ``.avi``, ...; OpenCV decodes it; frames sampled evenly);
            * a dataset of good samples (``edge_ad.data``; a test split or anomalous labels are refused);
            * a list / array of uint8 frames ((H, W), (H, W, 1) or (H, W, 3) in ``color_order``).
            A path inside an MVTec ``test`` / ``ground_truth`` split raises :class:`TestSplitError`.
        spec: the detector's :class:`PreprocessSpec` (``detector.preprocess_spec``).
        count: total images N (good + synthetic); 128 is a common INT8 calibration size.
        synthetic_fraction: share of synthetic anomalies in [0, 1); default
            :data:`DEFAULT_SYNTHETIC_FRACTION` = 0.25 (measured better than normal-only; see there).
        seed: non-negative seed of the synthetic anomalies (selection is seed-free).
        min_count: warn (``UserWarning``) when the set ends up smaller than this.
        feature_fn: optional ``fn(images float32 (B, 3, H, W) preprocessed with spec) -> (B, D)``
            descriptors for the diversity selection (e.g. the backbone's global token); default:
            16 x 16 RGB thumbnails (:func:`image_descriptors`).
        color_order: channel order of in-memory frames (``"rgb"`` / ``"bgr"``).
        max_candidates: at most this many candidates (evenly spaced over the source) are scored.

    Returns:
        :class:`CalibrationSet`; good images first (in selection order), then synthetic ones.

    Raises:
        TestSplitError: the source is test data or holds anomalous samples.
        FileNotFoundError / ValueError / TypeError: unusable source or arguments.
    """
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec (detector.preprocess_spec), got {type(spec).__name__}")
    if isinstance(count, bool) or int(count) != count or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    if not 0.0 <= float(synthetic_fraction) < 1.0:
        raise ValueError(f"synthetic_fraction must be in [0, 1), got {synthetic_fraction}")
    if color_order not in ("rgb", "bgr"):
        raise ValueError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")
    if max_candidates < 1:
        raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    f = float(synthetic_fraction)
    src = _make_source(source, color_order, int(max_candidates))
    n_all = len(src.names)
    if n_all == 0:
        raise ValueError(f"no images in the calibration source ({src.description})")
    m = min(n_all, int(max_candidates))
    candidates = np.unique(np.round(np.linspace(0, n_all - 1, m)).astype(np.int64))

    n_syn = int(round(count * f))
    n_good = count - n_syn
    if n_good < 1:
        n_good, n_syn = 1, count - 1
    if n_good > len(candidates):
        n_good = len(candidates)
        n_syn = int(round(n_good * f / (1.0 - f)))
    total = n_good + n_syn
    if total < min_count:
        warnings.warn(
            f"calibration with only {total} images; ≥ {min_count} recommended ({n_good} good of {len(candidates)} "
            f"candidates + {n_syn} synthetic): INT8 ranges from so few images clip real activations. Add good images "
            "(more frames, a longer video) or lower count only for experiments",
            UserWarning,
            stacklevel=2,
        )

    chunk = 32  # decoded source frames held at once (bounded memory for large frames / videos)
    feats = _features(src, candidates, spec, feature_fn, chunk)
    picked = candidates[k_center_greedy(feats, n_good)].tolist()

    # Synthetic item j alters good pick bases[j] (a seeded order, cycling) with its own generator
    # (seed, j): results do not depend on the order frames are decoded in.
    bases = np.random.default_rng(int(seed)).permutation(n_good)[np.arange(n_syn) % n_good] if n_syn else []
    by_base: dict[int, list[int]] = {}
    for j, b in enumerate(bases):
        by_base.setdefault(int(b), []).append(j)

    images = np.empty((total, 3, spec.height, spec.width), np.float32)
    masks = np.zeros((total, spec.height, spec.width), bool)
    files = [src.names[i] for i in picked] + [""] * n_syn
    variants = ["good"] * total
    for positions, frames in src.stream(picked, chunk):
        images[positions] = preprocess_batch(frames, spec, color_order="rgb")
        syn_slots, syn_frames = [], []
        for pos, frame in zip(positions, frames):
            for j in by_base.get(pos, []):
                rng = np.random.default_rng([int(seed), j])
                img, mask, variant = _synthesise(frame, SYNTHETIC_VARIANTS[j % len(SYNTHETIC_VARIANTS)], rng)
                slot = n_good + j
                syn_slots.append(slot)
                syn_frames.append(img)
                masks[slot] = _mask_to_input(mask, spec)
                files[slot] = f"synthetic:{variant}:{src.names[picked[pos]]}"
                variants[slot] = variant
        if syn_frames:
            images[syn_slots] = preprocess_batch(syn_frames, spec, color_order="rgb")
    kinds = ["good"] * n_good + ["synthetic"] * n_syn
    selection = ("k-center greedy on feature_fn features" if feature_fn is not None
                 else "k-center greedy on 16x16 RGB thumbnails")
    return CalibrationSet(
        images=images, masks=masks, spec=spec, files=files, kinds=kinds, variants=variants,
        synthetic_fraction=f, seed=int(seed), hash=content_hash(images, spec), source=src.description,
        selection=selection, num_candidates=int(len(candidates)),
    )
