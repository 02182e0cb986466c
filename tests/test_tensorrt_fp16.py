"""The FP16 ONNX a TensorRT 11 (strongly typed) FP16 engine is built from, on real images.

No TensorRT here: this checks what edge_ad controls on that path - the FP32 -> FP16 ONNX
conversion (:func:`edge_ad.converters.fp16.convert_fp16`) keeps the FP32 islands and matches the
FP32 model's maps and AUROC in onnxruntime, on the shared tiny knn run (real EfficientNet-Lite0
weights, real hazelnut images) - the way INT8 conversions are checked (``fidelity_report``).
"""
from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from edge_ad.converters.convert import convert  # noqa: E402
from edge_ad.converters.fp16 import convert_fp16, fp16_fidelity, island_dtypes  # noqa: E402
from edge_ad.data import MVTecDataset  # noqa: E402
from edge_ad.runtime import load_bundle  # noqa: E402

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def trt_bundle(knn_run, tmp_path_factory):
    """A real x86-tensorrt FP16 bundle: its model.onnx is the FP32 ONNX build-engine starts from."""
    return load_bundle(convert(knn_run, "x86-tensorrt", tmp_path_factory.mktemp("fp16") / "b", precision="fp16",
                               calib_count=8, progress=False))


def test_fp16_onnx_matches_fp32_on_real_images(trt_bundle, real_root, tmp_path):
    data = MVTecDataset(real_root, CATEGORY, "test")
    rows = {preset: (conv, rep) for preset, conv, rep in
            fp16_fidelity(trt_bundle.path("model.onnx"), data, trt_bundle.preprocess_spec, tmp_path,
                          presets=("default", "none"))}
    conv, rep = rows["default"]
    assert conv.fp32_nodes and conv.casts > 0 and not rows["none"][0].fp32_nodes
    assert rep.num_images == len(data) and set(rep.metrics) == {"image_auroc", "pixel_auroc"}
    # Measured (docs/JETSON.md, benchmarks/trt11_fp16_fidelity.py): max error 0.057 = ~1 % of the
    # map range, Pearson 0.99996, AUROC deltas <= 0.01 pt. The budgets leave room for CPU noise only.
    span = rep.map["reference_max"] - rep.map["reference_min"]
    for _, r in rows.values():
        assert r.failures(max_metric_drop=0.002, min_map_pearson=0.9995) == [], r.table()
        assert r.map["max_abs_error"] < 0.03 * span, r.table()


def test_fp16_onnx_keeps_the_islands_fp32(trt_bundle, tmp_path):
    conv = convert_fp16(trt_bundle.path("model.onnx"), tmp_path / "m16.onnx")
    model = onnx.load(str(conv.path))
    types = island_dtypes(model, conv.fp32_nodes)
    assert types and all(t == {onnx.TensorProto.FLOAT} for t in types.values()), types
    everything = island_dtypes(model, [n.name for n in model.graph.node])
    assert sum(t == {onnx.TensorProto.FLOAT16} for t in everything.values()) > len(conv.fp32_nodes)
    # Graph I/O stay FP32: the bundle's input / output contract does not change.
    assert {vi.type.tensor_type.elem_type for vi in [*model.graph.input, *model.graph.output]} == {
        onnx.TensorProto.FLOAT}
    with pytest.raises(ValueError, match="already has FP16"):
        convert_fp16(conv.path, tmp_path / "again.onnx")
