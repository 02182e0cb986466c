"""Generator-made anomaly data in three resumable stages, written in MVTec layout.

(a) **normals**: a text-to-image pipeline renders ``per_object`` images per object from
    ``objects x backgrounds`` prompts (:class:`~edge_ad.synth.prompts.PromptSet`);
(b) **inpainting**: a random box (side ``box_size`` px, default 50-300, centred on a foreground
    pixel of :func:`~edge_ad.synth.foreground.foreground_mask`) is inpainted with an
    object-specific damage prompt;
(c) **filtering**: :class:`~edge_ad.synth.filtering.FeatureDistanceFilter`: mask = (1 - cosine of
    backbone patch features between normal and inpainted image) > T, intersected with the box;
    samples with an empty mask are dropped.

Output (read unchanged by the zero-shot trainer and ``edge-ad evaluate``)::

    OUT/<object>/train/good/NNNNN.png                     stage (a)
    OUT/<object>/test/good/NNNNN.png                      the same normals as clean annotated samples
    OUT/<object>/test/synthetic/NNNNN.png                 kept stage (b) images
    OUT/<object>/ground_truth/synthetic/NNNNN_mask.png    their stage (c) masks (0 / 255)
    OUT/manifest.jsonl                                    one JSON line per finished sample
    OUT/synth_config.json                                 the settings of the run

The normals are also listed under ``test/good`` (a hard link, else a copy), so the generated set
trains a zero-shot method on its own: the reference AnomalyVFM trains on every normal *and* its
inpainted copy (``aux_dataset.py``: ``train/*/*.png``, label = "bad" in the path), about half clean
images; without clean annotated samples the image head learns "always anomalous".

Every random choice is seeded from ``(seed, object index, sample index, stage)``, so a run stopped
anywhere and started again (``resume``) skips normals already on disk and samples already in the
manifest and produces exactly what an uninterrupted run would have. Files are written atomically
(temporary name, then rename) and a manifest line is appended only after its files exist.

The pipelines are ``diffusers`` pipelines loaded from a **local folder** (FLUX.1-dev / FLUX.1-Fill
on a workstation; any text-to-image / inpainting pipeline works, e.g. Stable Diffusion), or
already-built pipeline objects. Nothing is downloaded.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .filtering import FeatureDistanceFilter, FilterResult
from .foreground import foreground_mask
from .prompts import PromptSet

__all__ = [
    "MANIFEST_FILE",
    "SynthConfig",
    "choose_box",
    "generate_cheap_dataset",
    "generate_dataset",
    "load_pipeline",
    "read_manifest",
]

MANIFEST_FILE = "manifest.jsonl"
CONFIG_FILE = "synth_config.json"
_STAGE_NORMAL, _STAGE_INPAINT = 0, 1


@dataclass
class SynthConfig:
    """Settings of :func:`generate_dataset` (stored in ``OUT/synth_config.json``).

    Attributes:
        objects: object names to render (None = every object of the prompt set).
        per_object: samples (normal + inpainted) per object.
        image_size: side of the generated square images in pixels (multiple of 16).
        box_size: (min, max) side of the inpainted box in pixels (clipped to the image).
        threshold: feature cosine distance T of stage (c).
        steps: denoising steps of both pipelines.
        guidance_scale: classifier-free guidance of both pipelines (None = the pipeline default).
        seed: base seed.
        filter_backbone: backbone registry name of the stage (c) filter.
        filter_size: input size of the filter backbone.
        use_foreground: centre boxes on the estimated foreground (else anywhere).
    """

    objects: tuple[str, ...] | None = None
    per_object: int = 10
    image_size: int = 512
    box_size: tuple[int, int] = (50, 300)
    threshold: float = 0.3
    steps: int = 28
    guidance_scale: float | None = None
    seed: int = 0
    filter_backbone: str = "efficientnet_lite0"
    filter_size: int = 256
    use_foreground: bool = True

    def __post_init__(self) -> None:
        if self.objects is not None:
            self.objects = tuple(str(o) for o in self.objects)
        for name in ("per_object", "image_size", "steps", "filter_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (latent pipelines), got {self.image_size}")
        low, high = (int(v) for v in self.box_size)
        if not 1 <= low <= high:
            raise ValueError(f"box_size must be (min, max) pixels with 1 <= min <= max, got {self.box_size!r}")
        if low > self.image_size:
            raise ValueError(f"box_size min {low} exceeds image_size {self.image_size}; lower --box-size")
        self.box_size = (low, high)
        self.threshold = float(self.threshold)
        self.seed = int(self.seed)


def read_manifest(out: str | Path) -> list[dict[str, Any]]:
    """The manifest records of ``out`` (empty if none); a torn last line (crash mid-write) is ignored."""
    path = Path(out) / MANIFEST_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the last line can be torn; its sample is simply redone
    return records


def load_pipeline(source: Any, task: str, *, device: str = "cpu", dtype: Any = None) -> Callable[..., Any]:
    """A diffusers pipeline for ``task`` (``"text-to-image"`` or ``"inpainting"``).

    Args:
        source: a built pipeline (returned as is) or a local folder saved with
            ``save_pretrained`` (``model_index.json`` inside); loaded with ``local_files_only``.
        task: what the pipeline must do.
        device: where to run it.
        dtype: torch dtype (e.g. ``torch.bfloat16`` for FLUX on a GPU); None = as saved.
    """
    if task not in ("text-to-image", "inpainting"):
        raise ValueError(f"task must be 'text-to-image' or 'inpainting', got {task!r}")
    if callable(source) and not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a local diffusers pipeline folder (no model_index.json); download one on a machine with "
            "network access (e.g. FLUX.1-dev for text-to-image, FLUX.1-Fill-dev for inpainting) and pass its folder"
        )
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise ImportError("generator stages need diffusers: pip install 'edge-ad[synth]'") from e
    import inspect

    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    # The folder's own pipeline class (model_index.json), not an Auto* task mapping: FLUX.1-Fill
    # (FluxFillPipeline) is not in diffusers' auto-inpainting table, and any pipeline with the
    # right call signature will do.
    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    params = inspect.signature(pipe.__call__).parameters
    if (task == "inpainting") != ("mask_image" in params):
        raise ValueError(f"{path} holds a {type(pipe).__name__}, which is not {'an' if task == 'inpainting' else 'a'} {task} pipeline "
                         f"({'needs' if task == 'inpainting' else 'must not take'} a mask_image argument)")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # our own bar counts samples
    return pipe


def choose_box(image: np.ndarray, rng: np.random.Generator, box_size: tuple[int, int],
               use_foreground: bool = True) -> tuple[int, int, int, int]:
    """A random box ``(x0, y0, x1, y1)`` (pixels, exclusive ends) inside the image.

    Sides are drawn uniformly from ``box_size`` (clipped to the image); the box is centred on a
    random foreground pixel (:func:`foreground_mask`) and shifted to stay inside the image.
    """
    h, w = image.shape[:2]
    low, high = box_size
    bw = int(rng.integers(min(low, w), min(high, w) + 1))
    bh = int(rng.integers(min(low, h), min(high, h) + 1))
    fg = foreground_mask(image) if use_foreground else np.ones((h, w), dtype=bool)
    ys, xs = np.nonzero(fg)
    if len(ys) == 0:
        ys, xs = np.array([h // 2]), np.array([w // 2])
    k = int(rng.integers(len(ys)))
    cy, cx = int(ys[k]), int(xs[k])
    x0 = int(np.clip(cx - bw // 2, 0, w - bw))
    y0 = int(np.clip(cy - bh // 2, 0, h - bh))
    return (x0, y0, x0 + bw, y0 + bh)


def _rng(seed: int, obj: int, index: int, stage: int) -> np.random.Generator:
    return np.random.default_rng([seed, obj, index, stage])


def _torch_generator(rng: np.random.Generator) -> tuple[Any, int]:
    import torch

    s = int(rng.integers(0, 2**31 - 1))
    return torch.Generator("cpu").manual_seed(s), s


def _to_uint8(image: Any, size: int) -> np.ndarray:
    """A pipeline image (PIL or float array in [0, 1]) -> uint8 (size, size, 3) RGB."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    if image.size != (size, size):  # some pipelines round sizes; keep one size per dataset
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8).copy()


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)  # never leave a truncated PNG under the real name


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8).copy()


def generate_dataset(
    out: str | Path,
    text_to_image: Any,
    inpaint: Any,
    *,
    prompts: PromptSet | str | Path | None = None,
    config: SynthConfig | None = None,
    device: str = "cpu",
    dtype: Any = None,
    resume: bool = True,
    progress: bool = True,
    pipeline_kwargs: dict[str, Any] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run stages (a), (b), (c) and write an MVTec-layout dataset under ``out``.

    Args:
        out: output root (created).
        text_to_image: stage (a) pipeline or its local folder (see :func:`load_pipeline`).
        inpaint: stage (b) pipeline or its local folder.
        prompts: a :class:`PromptSet`, a YAML / JSON prompt file, or None (defaults).
        config: :class:`SynthConfig`; or give its fields as keyword ``settings``
            (``per_object=4, image_size=512, ...``), not both.
        device, dtype: where / in which dtype to run the pipelines and the filter.
        resume: continue a run in ``out`` (skip finished work). False with existing output is an
            error, so a finished dataset is never overwritten by accident.
        progress: tqdm bars per stage.
        pipeline_kwargs: extra keyword arguments for both pipeline calls (e.g.
            ``{"max_sequence_length": 512}`` for FLUX).

    Returns:
        Summary: ``{"out", "objects", "normals", "kept", "dropped", "manifest"}``.
    """
    if config is not None and settings:
        raise TypeError("pass either config=SynthConfig(...) or its fields as keywords, not both")
    config = config or SynthConfig(**settings)
    if prompts is None:
        prompts = PromptSet()
    elif not isinstance(prompts, PromptSet):
        prompts = PromptSet.from_file(prompts)
    objects = list(config.objects or prompts.objects)
    unknown = [o for o in objects if o not in prompts.objects]
    if unknown:
        raise ValueError(f"objects {unknown} are not in the prompt set; known: {list(prompts.objects)}")
    out = Path(out)
    manifest_path = out / MANIFEST_FILE
    if not resume and (manifest_path.exists() or any(out.glob("*/train/good/*.png"))):
        raise FileExistsError(f"{out} already holds a synthetic dataset; pass resume=True to continue it "
                              "or choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _check_config_matches(out, config, prompts)
    extra = dict(pipeline_kwargs or {})
    if config.guidance_scale is not None:
        extra["guidance_scale"] = config.guidance_scale
    size = config.image_size
    jobs = [(oi, obj, i) for oi, obj in enumerate(objects) for i in range(config.per_object)]

    # ---- stage (a): normals
    todo_a = [j for j in jobs if not _normal_path(out, prompts, j).is_file()]
    if todo_a:
        t2i = load_pipeline(text_to_image, "text-to-image", device=device, dtype=dtype)
        for oi, obj, i in _bar(todo_a, progress, "synth (a) normals"):
            rng = _rng(config.seed, oi, i, _STAGE_NORMAL)
            prompt, _ = prompts.normal_prompt(obj, rng)
            generator, _ = _torch_generator(rng)
            result = t2i(prompt=prompt, height=size, width=size, num_inference_steps=config.steps,
                         generator=generator, output_type="np", **extra)
            _save_png(_normal_path(out, prompts, (oi, obj, i)), _to_uint8(result.images[0], size))
        del t2i
    for job in jobs:  # also for datasets written before test/good existed (resume adds them)
        _link_clean_copy(_normal_path(out, prompts, job))

    # ---- stages (b) + (c): inpaint, filter, record
    done = {r["id"] for r in read_manifest(out)}
    todo_b = [j for j in jobs if _sample_id(prompts, j) not in done]
    if todo_b:
        pipe = load_pipeline(inpaint, "inpainting", device=device, dtype=dtype)
        filt = FeatureDistanceFilter(config.filter_backbone, threshold=config.threshold,
                                     img_size=config.filter_size, device=device)
        with manifest_path.open("a", encoding="utf-8") as manifest:
            for job in _bar(todo_b, progress, "synth (b, c) inpaint + filter"):
                record = _inpaint_and_filter(out, prompts, config, pipe, filt, job, extra)
                manifest.write(json.dumps(record) + "\n")
                manifest.flush()
                os.fsync(manifest.fileno())  # a line on disk = a finished sample, across crashes
    records = {r["id"]: r for r in read_manifest(out)}
    kept = sum(1 for r in records.values() if r["kept"])
    return {"out": str(out), "objects": [PromptSet.folder(o) for o in objects], "normals": len(jobs),
            "kept": kept, "dropped": len(records) - kept, "manifest": str(manifest_path)}


def generate_cheap_dataset(
    out: str | Path,
    images: dict[str, Sequence[str | Path]],
    *,
    synthesizer: str = "perlin",
    per_image: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """The same MVTec-layout triplets without a generator: CutPaste / Perlin anomalies on given images.

    For a CPU box, or to mix cheap and generated data. Each source image is copied to
    ``OUT/<category>/train/good/NNNNN.png`` (and listed as a clean annotated sample in
    ``test/good``, as :func:`generate_dataset` does); ``per_image`` anomalous copies go to
    ``test/synthetic`` with their exact masks (the changed pixels) in ``ground_truth/synthetic``;
    one manifest line per anomaly. Resumable like :func:`generate_dataset` (finished ids skipped).

    Args:
        out: output root.
        images: category name -> image files (uint8 RGB readable by Pillow).
        synthesizer: ``"perlin"`` (:class:`~edge_ad.synth.PerlinAnomaly`) or ``"cutpaste"``.
        per_image: anomalies per source image.
        seed: base seed (each sample seeded from ``(seed, category index, image index, copy)``).
        progress: tqdm bar.
    """
    from .cutpaste import CutPaste
    from .perlin import PerlinAnomaly

    makers = {"perlin": PerlinAnomaly, "cutpaste": CutPaste}
    if synthesizer not in makers:
        raise ValueError(f"synthesizer must be one of {sorted(makers)}, got {synthesizer!r}")
    if int(per_image) < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}")
    synth = makers[synthesizer]()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_manifest(out)}
    jobs = [(ci, cat, i, Path(p)) for ci, (cat, paths) in enumerate(sorted(images.items()))
            for i, p in enumerate(sorted(paths))]
    with (out / MANIFEST_FILE).open("a", encoding="utf-8") as manifest:
        for ci, cat, i, src in _bar(jobs, progress, f"synth ({synthesizer})"):
            folder = out / PromptSet.folder(cat)
            image = _load_png(src)
            good = folder / "train" / "good" / f"{i:05d}.png"
            if not good.is_file():
                _save_png(good, image)
            _link_clean_copy(good)
            for k in range(int(per_image)):
                n = i * int(per_image) + k
                sample_id = f"{PromptSet.folder(cat)}/{n:05d}"
                if sample_id in done:
                    continue
                rng = np.random.default_rng([seed, ci, i, k])
                aug, mask = synth(image, rng)
                record: dict[str, Any] = {"id": sample_id, "object": cat, "index": n, "synthesizer": synthesizer,
                                          "source": str(src), "seed": [seed, ci, i, k], "kept": bool(mask.any()),
                                          "mask_pixels": int(mask.sum())}
                if record["kept"]:
                    ys, xs = np.nonzero(mask)
                    record["box"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
                    _save_png(folder / "test" / "synthetic" / f"{n:05d}.png", aug)
                    _save_png(folder / "ground_truth" / "synthetic" / f"{n:05d}_mask.png", mask.astype(np.uint8) * 255)
                manifest.write(json.dumps(record) + "\n")
                manifest.flush()
    records = read_manifest(out)
    kept = sum(1 for r in records if r["kept"])
    return {"out": str(out), "objects": sorted(PromptSet.folder(c) for c in images), "normals": len(jobs),
            "kept": kept, "dropped": len(records) - kept, "manifest": str(out / MANIFEST_FILE)}


def _inpaint_and_filter(out: Path, prompts: PromptSet, config: SynthConfig, pipe: Any,
                        filt: FeatureDistanceFilter, job: tuple[int, str, int],
                        extra: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    oi, obj, i = job
    size = config.image_size
    normal_path = _normal_path(out, prompts, job)
    normal = _load_png(normal_path)
    rng_a = _rng(config.seed, oi, i, _STAGE_NORMAL)
    normal_prompt, background = prompts.normal_prompt(obj, rng_a)
    _, normal_seed = _torch_generator(rng_a)

    rng = _rng(config.seed, oi, i, _STAGE_INPAINT)
    box = choose_box(normal, rng, config.box_size, config.use_foreground)
    prompt, damage = prompts.damage_prompt(obj, rng)
    generator, inpaint_seed = _torch_generator(rng)
    mask_image = np.zeros(normal.shape[:2], dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask_image[y0:y1, x0:x1] = 255
    result = pipe(prompt=prompt, image=Image.fromarray(normal), mask_image=Image.fromarray(mask_image),
                  height=size, width=size, num_inference_steps=config.steps, generator=generator,
                  output_type="np", **extra)
    inpainted = _to_uint8(result.images[0], size)
    verdict: FilterResult = filt(normal, inpainted, box)

    folder = out / PromptSet.folder(obj)
    record: dict[str, Any] = {
        "id": _sample_id(prompts, job),
        "object": obj,
        "index": i,
        "normal": {"path": str(normal_path.relative_to(out)), "prompt": normal_prompt, "background": background,
                   "seed": normal_seed},
        "anomaly": {"prompt": prompt, "damage": damage, "seed": inpaint_seed, "box": list(box)},
        "threshold": config.threshold,
        "kept": verdict.kept,
        "distance": verdict.summary(),
    }
    if verdict.kept:
        image_path = folder / "test" / "synthetic" / f"{i:05d}.png"
        mask_path = folder / "ground_truth" / "synthetic" / f"{i:05d}_mask.png"
        _save_png(image_path, inpainted)
        _save_png(mask_path, verdict.mask.astype(np.uint8) * 255)
        record["anomaly"].update(path=str(image_path.relative_to(out)), mask_path=str(mask_path.relative_to(out)))
    return record


def _normal_path(out: Path, prompts: PromptSet, job: tuple[int, str, int]) -> Path:
    _, obj, i = job
    return out / PromptSet.folder(obj) / "train" / "good" / f"{i:05d}.png"


def _link_clean_copy(normal: Path) -> None:
    """``<object>/train/good/N.png`` -> ``<object>/test/good/N.png`` (hard link, else a copy), once."""
    import shutil

    target = normal.parent.parent.parent / "test" / "good" / normal.name
    if target.is_file() or not normal.is_file():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(normal, tmp)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(normal, tmp)
    tmp.replace(target)


def _sample_id(prompts: PromptSet, job: tuple[int, str, int]) -> str:
    _, obj, i = job
    return f"{PromptSet.folder(obj)}/{i:05d}"


def _check_config_matches(out: Path, config: SynthConfig, prompts: PromptSet) -> None:
    """Write ``synth_config.json``, or check that a resumed run uses the same settings."""
    doc = {"config": asdict(config), "prompts": prompts.to_dict()}
    doc = json.loads(json.dumps(doc))  # tuples -> lists, as read back
    path = out / CONFIG_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        # per_object / objects may grow on resume (more samples); everything else must match.
        keys = [k for k in doc["config"] if k not in ("per_object", "objects")]
        diff = [k for k in keys if old["config"].get(k) != doc["config"][k]]
        if diff or old.get("prompts") != doc["prompts"]:
            raise ValueError(f"{out} was generated with other settings ({diff or ['prompts']}); resuming would mix "
                             "two datasets. Use the same settings or another output folder")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _bar(items: Sequence[Any], progress: bool, desc: str) -> Any:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="img", dynamic_ncols=True)
