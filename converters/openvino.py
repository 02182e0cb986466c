"""OpenVINO conversion: IR in FP32, FP16 (compressed weights) and INT8 (NNCF post-training quantisation).

Precision recipe for anomaly detectors:

* Only the encoder and the method's learned projector are quantised (``/backbone/``, ``/projector/``
  nodes), minus the layer that reads the image (a CNN's stem; a ViT's patch embedding is outside the
  ViT scopes anyway), as in the Q/DQ recipe: keeping it float cut the INT8 score error of knn and
  FoundAD by 31-57 % on all four real categories for no measurable engine time
  (``docs/VS_ANOMALIB.md``, "INT8 recipe"). Depthwise convs are quantised unless the method asks
  otherwise (:attr:`AnomalyDetector.int8_quantize_depthwise`).
* The scoring head stays in floating point: knn scores are ``‖a‖² + ‖b‖² − 2ab`` (an INT8
  MatMul there loses everything to cancellation) and FoundAD scores are a small residual between
  two nearly equal feature maps; the Gaussian smoothing and the normalisation are cheap anyway.
* ViTs get ``model_type=TRANSFORMER`` (NNCF then leaves residual Adds, LayerNorm and Softmax in
  floating point and may apply SmoothQuant).
* OpenVINO silently runs FP32 IR in bf16 on CPUs that support it. Every conversion records the
  inference-precision hint it was measured with, and :func:`compile_openvino` always sets it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

OPENVINO_PRECISIONS = ("fp32", "fp16", "int8")

#: Node-name regexes (matched at the start of the name) of what INT8 may quantise; torch.onnx names
#: nodes by module path and OpenVINO keeps those names. Everything else is an NNCF ignored scope.
#: CNN backbones: the whole encoder and the method's projector.
QUANTIZABLE_SCOPES = (r"/backbone/", r"/projector/")
#: ViT backbones: "INT8-Linear-only" - the Linear layers inside the blocks (qkv, proj, MLP) and the
#: projector; patch embedding, norms, attention products and the residual stream stay in floating
#: point. On a random-init DINOv3 ViT-S (LayerScale 1.0) this took the INT8 map cosine against FP32
#: from 0.977 (whole encoder) to 0.995.
#: ``/blocks.N/``: methods that run the ViT's blocks from their own forward (VisualAD inserts tokens
#: into the sequence) get top-level block scopes in the export.
VIT_QUANTIZABLE_SCOPES = (r"/backbone/blocks\.\d+/(attn/(qkv|proj)|mlp/fc\w*)/", r"/projector/",
                          r"/blocks\.\d+/(attn/(qkv|proj)|mlp/fc\w*)/")


def _require_openvino():
    try:
        import openvino as ov
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("OpenVINO is not installed: pip install edge-ad[convert] (or pip install openvino)") from exc
    return ov


def inference_precision_hint(precision: str, device: str = "CPU") -> str:
    """The ``INFERENCE_PRECISION_HINT`` a bundle pins for ``precision`` on ``device``.

    CPU: always ``"f32"`` (FP16 IR only compresses weights; without the hint, AVX512-BF16 / AMX CPUs
    would run bf16 and fidelity would not be what was measured). GPU / NPU: ``"f16"`` for fp16 and
    int8 (their native float type), ``"f32"`` for fp32.
    """
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
    if device.upper().startswith("CPU") or precision == "fp32":
        return "f32"
    return "f16"


@dataclass
class OpenVINOResult:
    """What :func:`convert_openvino` wrote.

    Attributes:
        xml, bin: the IR files.
        precision: ``fp32 | fp16 | int8``.
        inference_precision_hint: the hint the model must be compiled with (recorded in bundles).
        quantization: NNCF settings used for INT8 (None otherwise).
    """

    xml: Path
    bin: Path
    precision: str
    inference_precision_hint: str
    quantization: dict[str, Any] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["xml"], d["bin"] = str(self.xml), str(self.bin)
        return d


def _ignored_scope(quantizable: Sequence[str], float_layers: Sequence[str] = ()):
    import re

    import nncf

    alternatives = "|".join(f"(?:{s})" for s in quantizable)
    # One negative-lookahead pattern: every node whose name does not start with a quantizable
    # module path is ignored. Float layers by role are ignored by their ONNX node name, which
    # OpenVINO keeps (and may extend: "/conv_stem/Conv/WithoutBiases"), so "not followed by a name
    # character" keeps "/Conv" from also ignoring "/Conv_1".
    patterns = [rf"^(?!({alternatives})).*"] + [rf"^{re.escape(name)}(?![\w.])" for name in float_layers]
    return nncf.IgnoredScope(patterns=patterns, validate=False)


def convert_openvino(
    onnx_path: str | Path,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    calibration_images: np.ndarray | None = None,
    transformer: bool = False,
    device: str = "CPU",
    quantizable_scopes: Sequence[str] | None = None,
    accuracy_control: "AccuracyControl | None" = None,
    fast_bias_correction: bool = False,
    preset: str | None = None,
    keep_input_layers: bool = True,
    quantize_depthwise: bool = True,
) -> OpenVINOResult:
    """Convert a static-shape ONNX detector to OpenVINO IR ``out_dir/model.{xml,bin}``.

    Args:
        onnx_path: exported detector (input ``images`` (B,3,H,W) float32).
        out_dir: created if missing.
        precision: ``fp32``; ``fp16`` (weights compressed to FP16); ``int8`` (NNCF PTQ, needs
            ``calibration_images``).
        calibration_images: float32 (N, 3, H, W) normalised images (a calibration set, never test
            images); batched one image per NNCF sample.
        transformer: ``True`` for ViT backbones (``nncf.ModelType.TRANSFORMER``).
        device: target OpenVINO device, for the precision hint.
        quantizable_scopes: node-name regexes INT8 may quantise (everything else is ignored); None =
            :data:`VIT_QUANTIZABLE_SCOPES` when ``transformer`` else :data:`QUANTIZABLE_SCOPES`.
        accuracy_control: use ``nncf.quantize_with_accuracy_control`` with this metric and budget.
        fast_bias_correction: NNCF's fast bias correction. Off by default: the full correction cost
            3x the conversion time (27 s vs 10 s for FoundAD / EfficientNet-Lite0) and brought the
            magnetic-tile pixel-AUROC drop from 0.58 to 0.02 points (knn: 0.76 to +0.01).
        preset: ``"performance"`` (symmetric activations) or ``"mixed"`` (asymmetric activations,
            which suits the non-negative ReLU6 outputs of CNN backbones); None = NNCF's default.
        keep_input_layers: keep the layers that read the input image float (a CNN's stem conv).
            Measured on EfficientNet-Lite0 knn and FoundAD, 4 real categories
            (``benchmarks/int8_recipe.py``): INT8 score error against FP32 on the calibration
            images down 31-57 %, engine time unchanged (3 input channels).
        quantize_depthwise: quantise depthwise convs. False keeps them float like the Q/DQ
            recipe: INT8 score error down a further 24-79 % on the test sets, for +12-20 % (FoundAD)
            and +15-21 % (knn) INT8 engine time on the 2-core CPU of docs/VS_ANOMALIB.md.

    Returns:
        :class:`OpenVINOResult`.
    """
    ov = _require_openvino()
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {onnx_path}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    quantization = None
    if quantizable_scopes is None:
        quantizable_scopes = VIT_QUANTIZABLE_SCOPES if transformer else QUANTIZABLE_SCOPES
    if precision == "int8":
        from .qdq import float_layers_by_role

        float_layers = float_layers_by_role(onnx_path, keep_input_layers=keep_input_layers,
                                            quantize_depthwise=quantize_depthwise)
        model, quantization = _quantize(model, calibration_images, transformer=transformer,
                                        quantizable_scopes=quantizable_scopes, accuracy_control=accuracy_control,
                                        fast_bias_correction=fast_bias_correction, preset=preset,
                                        float_layers=float_layers)
    xml = out_dir / "model.xml"
    # FP16 IR = weights stored in FP16; compute precision is set by the hint at compile time.
    ov.save_model(model, str(xml), compress_to_fp16=(precision == "fp16"))
    return OpenVINOResult(xml, xml.with_suffix(".bin"), precision, inference_precision_hint(precision, device),
                          quantization)


@dataclass
class AccuracyControl:
    """Accuracy-aware INT8: NNCF reverts the most harmful quantisers until ``metric`` drops by at
    most ``max_drop`` (absolute) against the FP32 model.

    Attributes:
        images: float32 (N, 3, H, W) validation images (with defects, not the test split).
        metric: ``(maps (N, H, W), scores (N,)) -> float``, higher is better (e.g. pixel AUROC
            against synthetic-defect masks).
        max_drop: allowed absolute drop of ``metric``.
    """

    images: np.ndarray
    metric: Callable[[np.ndarray, np.ndarray], float]
    max_drop: float = 0.005


def _quantize(model, calibration_images, *, transformer, quantizable_scopes, accuracy_control, fast_bias_correction,
              preset=None, float_layers: dict[str, str] | None = None):
    import nncf

    if calibration_images is None or len(calibration_images) == 0:
        raise ValueError("INT8 needs calibration images: pass a calibration set built from good images "
                         "(edge_ad.calibration.build_calibration_set), never the test split")
    images = np.ascontiguousarray(calibration_images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"calibration images must be (N, 3, H, W), got {images.shape}")
    dataset = nncf.Dataset(list(images), lambda x: x[None])
    kwargs: dict[str, Any] = {
        "subset_size": len(images),
        "ignored_scope": _ignored_scope(quantizable_scopes, list(float_layers or {})),
        "fast_bias_correction": fast_bias_correction,
    }
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    if preset is not None:
        presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
        if preset not in presets:
            raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
        kwargs["preset"] = presets[preset]
    record = {"tool": f"nncf {nncf.__version__}", "num_calibration_images": int(len(images)),
              "model_type": "transformer" if transformer else "cnn", "quantizable_scopes": list(quantizable_scopes),
              "accuracy_control": None, "preset": preset, "fast_bias_correction": fast_bias_correction,
              "float_layers": dict(float_layers or {})}
    if accuracy_control is None:
        return nncf.quantize(model, dataset, **kwargs), record

    val_images = np.ascontiguousarray(accuracy_control.images, dtype=np.float32)

    def validate(compiled_model, data):
        maps, scores = [], []
        for x in data:
            out = compiled_model(x)
            maps.append(np.asarray(out[0])[:, 0])
            scores.append(np.asarray(out[1]).reshape(-1))
        if len(maps) != len(val_images):
            # NNCF probes with one item (and, in its "metric" mode, would rank quantizers by per-item
            # metrics). A set-level metric (pixel AUROC against the masks of *all* images) has no
            # per-item value: (None, None) puts NNCF in its "logits" mode, which ranks quantizers by
            # how much they change the outputs and calls this only with the whole validation set.
            return None, None
        return float(accuracy_control.metric(np.concatenate(maps), np.concatenate(scores))), None

    # Items stored already batched (1, 3, H, W) and no transform: NNCF hands ``validate`` the raw
    # items (Dataset.get_data), not the transformed ones, so a transform would never reach it.
    val_dataset = nncf.Dataset([image[None] for image in val_images])
    quantized = nncf.quantize_with_accuracy_control(
        model, dataset, val_dataset, validate,
        max_drop=accuracy_control.max_drop, drop_type=nncf.DropType.ABSOLUTE, **kwargs)
    record["accuracy_control"] = {"max_drop": accuracy_control.max_drop, "num_validation_images": len(val_images)}
    return quantized, record


def compile_openvino(xml_path: str | Path, *, device: str = "CPU", precision_hint: str = "f32", num_threads: int = 0):
    """Compile an IR with the inference precision pinned (never OpenVINO's silent bf16 default)."""
    ov = _require_openvino()
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise FileNotFoundError(f"OpenVINO IR not found: {xml_path}")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    core = ov.Core()
    return core.compile_model(core.read_model(str(xml_path)), device, config)


def rebatch_openvino(xml_path: str | Path, out_dir: str | Path, batch: int) -> tuple[Path, Path]:
    """Copy an IR with its input's static batch set to ``batch`` -> ``out_dir/model.{xml,bin}``.

    The weights and (INT8) quantisation parameters are the same numbers: only the batch dimension
    of the input, and what follows from it, changes (the caller checks per-frame equality with the
    batch-1 IR: a graph that bakes its batch into a reshape would not be equal).
    """
    import openvino as ov

    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    model = ov.Core().read_model(str(xml_path))
    shape = model.inputs[0].get_partial_shape()
    shape[0] = batch
    try:
        model.reshape({model.inputs[0]: shape})
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ValueError(f"cannot give {xml_path} a static batch of {batch}: {exc}; this model bakes its batch into "
                         "its graph, convert with --batch 1") from exc
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    xml = out_dir / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml, xml.with_suffix(".bin")


def openvino_runner(xml_path: str | Path, *, device: str = "CPU", precision_hint: str = "f32",
                    num_threads: int = 0) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``images (B,3,H,W) float32 -> (anomaly_map (B,1,H,W), score (B,))`` on an OpenVINO IR.

    Batches larger than the model's fixed batch are run in chunks of that size.
    """
    compiled = compile_openvino(xml_path, device=device, precision_hint=precision_hint, num_threads=num_threads)
    model_batch = int(compiled.inputs[0].get_partial_shape()[0].get_length())
    request = compiled.create_infer_request()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = np.ascontiguousarray(images, dtype=np.float32)
        maps, scores = [], []
        for start in range(0, len(images), model_batch):
            chunk = images[start : start + model_batch]
            n = len(chunk)
            if n < model_batch:  # pad the last chunk: the graph has a static batch
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], model_batch - n, axis=0)])
            out = request.infer({0: chunk})
            maps.append(np.asarray(out[compiled.outputs[0]])[:n].copy())
            scores.append(np.asarray(out[compiled.outputs[1]]).reshape(-1)[:n].copy())
        return np.concatenate(maps), np.concatenate(scores)

    return run
