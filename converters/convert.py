"""``edge_ad.convert``: a trained run directory -> a deployment bundle for one target.

One call does what an integrator needs on the way to a device::

    run dir ─► export ONNX (static shape, checked, validated vs torch on calibration images)
            ─► calibration set (good train images + synthetic defects; never a test split)
            ─► engine artifacts for the target:
                   openvino   : IR fp32 / fp16 / int8 (NNCF)          + model.onnx (fp32, portable truth)
                   onnxruntime: model.onnx fp32 or INT8 Q/DQ
                   tensorrt   : model.onnx fp32 (fp16 engine) or INT8 Q/DQ; engine built on the device
            ─► fidelity report: converted vs PyTorch FP32 (printed, stored in the bundle)
            ─► thresholds fitted on held-out good images with the converted model's own numerics
            ─► bundle (manifest.yaml + checksums) via edge_ad.runtime.write_bundle

TensorRT cannot run on a host without it: the TensorRT bundle's fidelity is measured by running
the exact ONNX the engine is built from in onnxruntime (its numerics proxy) and says so.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

#: Largest per-frame map / score difference (model units) between a re-batched (``batch=N``) model
#: and its batch-1 original that a conversion accepts. The numbers are the same weights through the
#: same kernels; what is left is the order of float additions in batched kernels.
MAX_REBATCH_ERROR = 1e-3


def _held_out_good(data: Path, category: str, training_images: list[str], limit: int) -> list[np.ndarray]:
    """Good train images the run did not train on (for threshold fitting), at most ``limit``."""
    from edge_ad.data import MVTecDataset

    train = MVTecDataset(data, category, "train")
    used = {str(Path(p).resolve()) for p in training_images}
    keep = [i for i, p in enumerate(train.paths) if str(Path(p).resolve()) not in used][:limit]
    return [train[i].image for i in keep]


def convert(
    run_dir: str | Path,
    target: str,
    out: str | Path,
    *,
    precision: str | None = None,
    calib: str | Path | None = None,
    calib_count: int = 128,
    synthetic_fraction: float | None = None,
    val_data: str | Path | None = None,
    val_category: str | None = None,
    threshold_fpr: float = 0.01,
    max_map_error: float | None = None,
    tar: bool = False,
    seed: int = 0,
    progress: bool = True,
    sign_key: str | Path | None = None,
    batch: int = 1,
    quantize_depthwise: bool | None = None,
) -> Path:
    """Convert a trained run into a bundle for ``target``.

    Args:
        run_dir: run directory (``model.safetensors`` + ``config.yaml``).
        target: registry name (``edge-ad targets``): ``intel-cpu``, ``jetson-orin``, ``onnx-cpu``, ...
        out: bundle directory (or ``.tar`` path with ``tar=True``) to write.
        precision: ``fp32 | fp16 | int8``; None = the target's default.
        calib: calibration source: a folder of good images, an MVTec category folder (its
            ``train/good``), or a video. Required for INT8; default = the run's training category.
        calib_count: calibration images (default 128, fewer when the source has fewer).
        synthetic_fraction: share of synthetic defects mixed into calibration (None = default).
        val_data, val_category: an MVTec-layout test split to measure fidelity on (image and pixel
            AUROC deltas need labels and masks); default = the calibration images (map errors only).
        threshold_fpr: image / pixel false-positive rate the stored thresholds are fitted at, on
            held-out good images of the deployment category: the run's category minus the images
            it trained on (few-shot), or ``val_data / val_category``'s good images (zero-shot runs,
            which record no single category). Without either the bundle has no thresholds (a
            warning says so; calibrate on site with ``edge-ad calibrate``).
        max_map_error: INT8 fidelity budget as ``1 - cosine`` between the INT8 and FP32 anomaly maps
            on the calibration images; when set, a sensitivity search keeps the most sensitive
            blocks in floating point until it holds (:mod:`edge_ad.converters.sensitivity`), and
            the conversion fails if even that cannot meet it (use fp16 then).
        tar: write one ``.tar`` file instead of a directory.
        sign_key: PEM file of an Ed25519 private key: sign the bundle (``manifest.sig``) so devices
            can refuse bundles from elsewhere (``Detector.load(..., verify_key=PUBLIC_PEM)``).
        batch: static batch N of the bundle's model (every target), for cross-camera batching
            (docs/MULTI_CAMERA.md). Conversion, calibration and fidelity run at batch 1 exactly as
            for ``batch=1``; the final model (OpenVINO IR, or the FP32 / Q/DQ INT8 ONNX of
            onnxruntime and TensorRT targets) is then re-batched (same weights and quantisation)
            and checked frame by frame against the batch-1 model on the calibration images (the largest
            map / score difference is recorded in ``info.batch``; above
            :data:`MAX_REBATCH_ERROR` the conversion fails).
        quantize_depthwise: INT8 only: quantise depthwise convs (CNN backbones). None = the
            recipe's default: OpenVINO follows the method
            (:attr:`~edge_ad.methods.base.AnomalyDetector.int8_quantize_depthwise`: knn and
            students quantise them, FoundAD keeps them float); the Q/DQ ONNX of TensorRT and
            onnxruntime targets keeps them float. The layer reading the image stays float in both.

    Returns:
        The bundle path.
    """
    from edge_ad.calibration import build_calibration_set, fit_thresholds
    from edge_ad.methods import load_checkpoint_config, load_detector
    from edge_ad.runtime import get_target
    from edge_ad.runtime.bundle import (
        BackboneInfo, Calibration, EngineSpec, InputSpec, Manifest, OutputSpec, Thresholds, write_bundle)
    from edge_ad.runtime.preprocessing import preprocess_batch

    from .export import export_onnx
    from .fidelity import fidelity_report, onnxruntime_runner, torch_runner

    tgt = get_target(target)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1 (frames per engine call), got {batch!r}")
    precision = precision or tgt.default_precision
    tgt.check_precision(precision)
    run_dir = Path(run_dir)
    detector = load_detector(run_dir).eval()
    run_config = load_checkpoint_config(run_dir)
    training = run_config.get("training", {}) or {}
    spec = detector.preprocess_spec
    transformer = not detector.backbone.info.name.startswith("efficientnet")
    if quantize_depthwise is not None and not isinstance(quantize_depthwise, bool):
        raise TypeError(f"quantize_depthwise must be True, False or None (the recipe's default), got {quantize_depthwise!r}")
    if quantize_depthwise is not None and precision != "int8":
        raise ValueError(f"quantize_depthwise applies to INT8 only; precision is {precision}")

    # Few-shot runs deploy on the category they were fitted on; zero-shot runs (trained on auxiliary
    # categories) deploy on another one, named by val_data / val_category: its good images then
    # serve as calibration set and threshold set (the run never saw them).
    few_shot = bool(training.get("category")) and isinstance(training.get("data"), str)
    if few_shot:
        deploy_data, deploy_category = Path(training["data"]), training["category"]
    elif val_data is not None and val_category:
        deploy_data, deploy_category = Path(val_data), val_category
    else:
        deploy_data = deploy_category = None
    if calib is None:
        if deploy_data is None:
            raise ValueError("pass calib=DIR (good images of the deployment category): the run does not record "
                             "one training category (a zero-shot run? then val_data / val_category name the "
                             "deployment category and supply both calibration and threshold images)")
        calib = deploy_data / deploy_category
    kwargs: dict[str, Any] = {"count": calib_count, "seed": seed}
    if synthetic_fraction is not None:
        kwargs["synthetic_fraction"] = synthetic_fraction
    calset = build_calibration_set(Path(calib), spec, **kwargs)
    print(f"[convert] calibration: {len(calset.images)} images from {calib} (hash {calset.hash[:12]})")

    work = Path(tempfile.mkdtemp(prefix="edge_ad_convert_"))
    onnx_fp32 = export_onnx(detector, work / "model.onnx", batch_size=1, validate_images=calset.images[:4])
    artifacts: dict[str, Any] = {}
    quant_record: dict[str, Any] | None = None
    proxy_note = None
    if tgt.engine == "openvino":
        from .openvino import convert_openvino, openvino_runner

        depthwise = detector.int8_quantize_depthwise if quantize_depthwise is None else quantize_depthwise
        if precision == "int8" and max_map_error is not None:
            from .openvino import QUANTIZABLE_SCOPES, VIT_QUANTIZABLE_SCOPES
            from .sensitivity import openvino_quantizer

            quantizer = openvino_quantizer(onnx_fp32, work / "search", calset.images, transformer=transformer,
                                           device=tgt.device, quantize_depthwise=depthwise)
            search = _search(quantizer, detector, onnx_fp32, calset.images, max_map_error, progress,
                             include=VIT_QUANTIZABLE_SCOPES if transformer else QUANTIZABLE_SCOPES,
                             quantize_depthwise=depthwise)
            ov = quantizer.results[frozenset(search["excluded"])]
            ov.quantization = {**(ov.quantization or {}), "sensitivity": search}
        else:
            ov = convert_openvino(onnx_fp32, work / "openvino", precision=precision,
                                  calibration_images=calset.images, transformer=transformer, device=tgt.device,
                                  quantize_depthwise=depthwise)
        artifacts = {"model.onnx": onnx_fp32, "openvino/model.xml": ov.xml, "openvino/model.bin": ov.bin}
        hints = {"INFERENCE_PRECISION_HINT": ov.inference_precision_hint}
        quant_record = ov.quantization
        # Fidelity is measured on this machine's CPU with the same pinned hint the bundle carries.
        runner = openvino_runner(ov.xml, precision_hint="f32" if tgt.device.upper() != "CPU" else ov.inference_precision_hint)
        if tgt.device.upper() != "CPU":
            proxy_note = f"measured on the host CPU (f32), not on {tgt.device}"
    else:
        model_onnx = onnx_fp32
        # Q/DQ keeps depthwise convs float unless told otherwise (its own measured default).
        depthwise_kw = {} if quantize_depthwise is None else {"quantize_depthwise": quantize_depthwise}
        if precision == "int8" and max_map_error is not None:
            from .sensitivity import qdq_quantizer

            quantizer = qdq_quantizer(onnx_fp32, work / "search", calset.images, **depthwise_kw)
            search = _search(quantizer, detector, onnx_fp32, calset.images, max_map_error, progress,
                             quantize_depthwise=bool(quantize_depthwise))
            model_onnx = quantizer.artifact(search["excluded"])
            quant_record = {**quantizer.results[frozenset(search["excluded"])].to_dict(), "sensitivity": search}
        elif precision == "int8":
            from .qdq import quantize_qdq

            model_onnx = work / "model_qdq.onnx"
            quant_record = quantize_qdq(onnx_fp32, model_onnx, calset.images, **depthwise_kw).to_dict()
        if tgt.engine == "tensorrt":
            from .trt_check import check_tensorrt_compatible

            problems = check_tensorrt_compatible(model_onnx)
            if problems:
                raise ValueError("the ONNX graph is not TensorRT-ready:\n  " + "\n  ".join(problems))
            proxy_note = "TensorRT is not run here: onnxruntime on the exact ONNX the engine is built from"
        artifacts = {"model.onnx": model_onnx}
        hints = tgt.engine_hints(precision)
        runner = onnxruntime_runner(model_onnx)

    thresholds = None
    if deploy_data is not None:
        exclude = training.get("images", []) if few_shot else []
        held_out = _held_out_good(deploy_data, deploy_category, exclude, 256)
        if held_out:
            maps, scores = runner(preprocess_batch(held_out, spec, color_order="rgb"))
            thresholds = fit_thresholds(scores, maps[:, 0], target_fpr=threshold_fpr, pixel_fpr=threshold_fpr,
                                        source=f"{len(held_out)} held-out good images of {deploy_category}")
    if thresholds is None:
        warnings.warn(f"{run_dir}: no held-out good images of the deployment category, so the bundle has no "
                      "thresholds (Result.is_anomalous stays None); pass val_data / val_category, or calibrate on "
                      "site: edge-ad calibrate BUNDLE --source GOOD_FRAMES", UserWarning, stacklevel=2)

    if val_data is not None:
        from edge_ad.data import MVTecDataset

        validation: Any = MVTecDataset(val_data, val_category or training.get("category"), "test")
        description = f"{val_data}/{val_category or training.get('category')} test split"
    else:
        validation, description = calset.images, "calibration images (map agreement only)"
    report = fidelity_report(torch_runner(detector), runner, validation, spec=spec, format=f"{tgt.name}",
                             precision=precision, description=description, thresholds=thresholds,
                             extra={"proxy": proxy_note} if proxy_note else None)
    print(report.table())
    batch_record = None
    if batch > 1:
        if tgt.engine == "openvino":
            from .openvino import openvino_runner, rebatch_openvino

            xml_n, bin_n = rebatch_openvino(artifacts["openvino/model.xml"], work / f"openvino_b{batch}", batch)
            hint = "f32" if tgt.device.upper() != "CPU" else ov.inference_precision_hint
            batch_record = _check_rebatched(runner, openvino_runner(xml_n, precision_hint=hint), calset.images, batch)
            artifacts["openvino/model.xml"], artifacts["openvino/model.bin"] = xml_n, bin_n
        else:
            from .rebatch import rebatch_onnx

            onnx_n = rebatch_onnx(artifacts["model.onnx"], batch)
            if tgt.engine == "tensorrt":
                problems = check_tensorrt_compatible(onnx_n)
                if problems:
                    raise ValueError(f"the batch-{batch} ONNX graph is not TensorRT-ready:\n  " + "\n  ".join(problems))
            batch_record = _check_rebatched(runner, onnxruntime_runner(onnx_n), calset.images, batch)
            artifacts["model.onnx"] = onnx_n

    # Weights stored as ONNX external data (models above 2 GiB) are artifacts too: bundles refuse unlisted files.
    from edge_ad.runtime.bundle.onnx_wire import read_onnx_external_data

    for location in {ref.location for ref in read_onnx_external_data(artifacts["model.onnx"])}:
        artifacts[location] = Path(artifacts["model.onnx"]).parent / location
    (work / "calibration.json").write_text(json.dumps(calset.to_manifest(), indent=2))
    artifacts["calibration.json"] = work / "calibration.json"
    fid = report.to_dict()
    manifest = Manifest(
        method=detector.method,
        backbone=BackboneInfo(name=detector.backbone.info.name, layers=tuple(detector.backbone.info.layers)),
        input=InputSpec.from_preprocess_spec(spec, batch=batch),
        outputs=(OutputSpec("anomaly_map", (batch, 1, spec.height, spec.width)), OutputSpec("score", (batch,))),
        precision=precision,
        target=tgt.name,
        engine=EngineSpec(tgt.engine, hints),
        normalization={k: float(v) for k, v in detector.normalizer.stats().items() if isinstance(v, (int, float))},
        thresholds=Thresholds.from_summary(thresholds.to_dict()) if thresholds is not None else None,
        calibration=Calibration.from_summary(calset.to_manifest()),
        fidelity=_fidelity_summary(fid),
        info={"run_dir": str(run_dir), "quantization": json.loads(json.dumps(quant_record, default=str)) if quant_record else None,
              **({"batch": batch_record} if batch_record else {})},
    )
    path = write_bundle(out, manifest, artifacts, fidelity=fid, tar=tar, sign_key=sign_key)
    print(f"[convert] bundle written to {path}")
    return path


def _check_rebatched(runner_1, runner_n, images: np.ndarray, batch: int) -> dict[str, Any]:
    """Compare a re-batched model with its batch-1 original frame by frame -> ``info.batch`` record.

    Both runners take ``images (B,3,H,W)`` and return ``(maps (B,1,H,W), scores (B,))``; the
    batch-N runner pads the last chunk. Raises ValueError when a map or score differs by more
    than :data:`MAX_REBATCH_ERROR` (model units), i.e. the graph depends on its batch.
    """
    maps_1, scores_1 = runner_1(images)
    maps_n, scores_n = runner_n(images)
    err = {"max_map_diff": float(np.abs(maps_n - maps_1).max()),
           "max_score_diff": float(np.abs(scores_n - scores_1).max())}
    if not all(np.isfinite(v) and v <= MAX_REBATCH_ERROR for v in err.values()):
        raise ValueError(f"the batch-{batch} model differs from the batch-1 model frame by frame ({err}, limit "
                         f"{MAX_REBATCH_ERROR}): its graph depends on the batch; convert with --batch 1")
    print(f"[convert] batch {batch}: per-frame max |map diff| {err['max_map_diff']:.3g}, |score diff| "
          f"{err['max_score_diff']:.3g} vs batch 1 on {len(images)} calibration images")
    return {"size": batch, "frames_compared": int(len(images)), **err}


def _search(quantizer, detector, onnx_path: Path, images: np.ndarray, max_error: float, progress: bool,
            include=None, *, quantize_depthwise: bool) -> dict[str, Any]:
    """Sensitivity search for an INT8 budget; raises when even the best mix cannot meet it."""
    from .fidelity import torch_runner
    from .qdq import float_layers_by_role
    from .sensitivity import group_quantizable_nodes, sensitivity_search

    groups = group_quantizable_nodes(onnx_path, include=include) if include else group_quantizable_nodes(onnx_path)
    # Layers the recipe keeps float anyway (the stem, depthwise convs) are no search candidates: a
    # group made of them only would cost a conversion and change nothing.
    always_float = float_layers_by_role(onnx_path, quantize_depthwise=quantize_depthwise)
    groups = {g: kept for g, nodes in groups.items() if (kept := [n for n in nodes if n not in always_float])}
    result = sensitivity_search(torch_runner(detector), quantizer, images, groups, max_error=max_error,
                                progress=progress)
    print(f"[convert] sensitivity search: INT8 map error {result.baseline_error:.4g} -> {result.error:.4g} "
          f"(budget {max_error:.4g}) keeping {len(result.excluded)} of {len(groups)} blocks in float")
    if not result.budget_met:
        raise ValueError(f"INT8 cannot meet the fidelity budget (1 - map cosine <= {max_error}): the best mix "
                         f"reached {result.error:.4g} with {list(result.excluded)} in float; convert with "
                         "--precision fp16 or relax --max-map-error")
    return result.to_dict()


def _fidelity_summary(report: dict[str, Any]) -> dict[str, float]:
    """The flat numbers of a fidelity report that go into the manifest (the full report is a file):
    ``map.<stat>``, ``score.<stat>`` and ``<metric>.<reference|candidate|delta>``."""
    summary: dict[str, float] = {}
    for section in ("map", "score"):
        for k, v in (report.get(section) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                summary[f"{section}.{k}"] = float(v)
    for metric, values in (report.get("metrics") or {}).items():
        for k, v in (values or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                summary[f"{metric}.{k}"] = float(v)
    return summary
