"""Runtime fault injection (issue 12, runtime half): engine errors mid-stream and dropped streams leave the
detector usable, None items and non-finite outputs are counted faults (never a "good" verdict), the engine's
real I/O is checked against the manifest at load, frame-size limits and model-resolution maps, degenerate /
live calibration, and the CLI's exit codes and messages. Real onnx-cpu / intel-cpu bundles of the shared knn
run, real hazelnut images."""
from __future__ import annotations

import gc
import logging
import shutil
import threading
import time
import warnings

import numpy as np
import pytest

from edge_ad.cli.main import main
from edge_ad.data import MVTecDataset
from edge_ad.runtime import BundleError, Detector, load_bundle, read_image, update_manifest
from edge_ad.runtime.calibrate import MIN_MARGIN, PixelSample, calibrate_bundle
from edge_ad.runtime.detector import DEFAULT_MAX_FRAME_PIXELS, NonFiniteOutputError
from edge_ad.runtime.sources import FrameSource
from edge_ad.runtime.stream import StreamError

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def frames(real_root):
    """Real test images (good and defective) as an OpenCV camera delivers them (BGR uint8)."""
    return [read_image(s.path, "bgr") for s in list(MVTecDataset(real_root, CATEGORY, "test"))[:8]]


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("edge_ad-stream")]


def _wait_no_stream_threads(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _stream_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _stream_threads(), f"stream threads left running: {_stream_threads()}"


class FaultyEngine:
    """Wraps a real engine; ``wait`` fails (like a driver error) once another request is in flight.

    The failing request is still completed on the real engine first (its slot is free, as the
    engines guarantee on error), so what stays in flight is exactly the *other* slots.
    """

    def __init__(self, engine, fail_at: int | None) -> None:
        self._engine, self.fail_at, self.waits = engine, fail_at, 0
        self.busy: set[int] = set()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def start(self, slot, n):
        self._engine.start(slot, n)
        self.busy.add(slot)

    def wait(self, slot):
        self.waits += 1
        if self.fail_at is not None and self.waits == self.fail_at:
            deadline = time.monotonic() + 5
            while len(self.busy) < 2 and time.monotonic() < deadline:  # the pipeline keeps another slot busy
                time.sleep(0.001)
            assert len(self.busy) >= 2, "the stream never had two requests in flight"
            self.busy.discard(slot)
            self._engine.wait(slot)
            raise RuntimeError("CUDA error 700: an illegal memory access was encountered")
        self.busy.discard(slot)
        return self._engine.wait(slot)


class NaNEngine(FaultyEngine):
    """Wraps a real engine; the outputs of chosen calls (1-based) are made non-finite."""

    def __init__(self, engine, nan_score_at=(), inf_map_at=()) -> None:
        super().__init__(engine, None)
        self.nan_score_at, self.inf_map_at = set(nan_score_at), set(inf_map_at)

    def wait(self, slot):
        maps, scores = super().wait(slot)
        if self.waits in self.nan_score_at:
            scores = scores.copy()
            scores[0] = np.nan
        if self.waits in self.inf_map_at:
            maps = maps.copy()
            maps[0, 3, 5] = np.inf
        return maps, scores


# -- 2: a stage error or a dropped stream must not poison later streams ------------------------------------------


def test_engine_error_mid_stream_then_a_new_stream_works(onnx_bundle, frames):
    det = Detector.load(onnx_bundle)
    real = det.engine
    det.engine = FaultyEngine(real, fail_at=3)
    got = []
    failed = det.stream(frames * 3, lossless=True)
    with pytest.raises(StreamError, match="CUDA error 700"):
        for res in failed:
            got.append(res.frame_index)
    assert got == [0, 1]
    _wait_no_stream_threads()
    s = failed.stats
    assert s.skipped.get("engine_error") == 1 and s.captured == s.delivered + s.dropped_total + s.skipped_total
    det.engine = real  # the driver recovered: the same detector streams again, every frame
    stream = det.stream(frames, lossless=True)
    results = list(stream)
    assert [r.frame_index for r in results] == list(range(len(frames)))
    assert results[0].score == det.predict(frames[0]).score  # slot 0 and its lock are free too
    assert stream.stats.captured == stream.stats.delivered == len(frames)


def test_engine_error_on_a_single_slot_engine_releases_predicts_lock(onnx_bundle, frames):
    det = Detector.load(onnx_bundle, slots=1)
    real = det.engine

    class Broken(FaultyEngine):
        def wait(self, slot):
            self._engine.wait(slot)
            raise MemoryError("out of device memory")

    det.engine = Broken(real, None)
    with pytest.raises(StreamError, match="out of device memory") as info:
        list(det.stream(frames, lossless=True))
    assert "engine_error" in str(info.value) or isinstance(info.value.__cause__, Exception)
    det.engine = real
    done = threading.Event()
    threading.Thread(target=lambda: (det.predict(frames[0]), done.set()), daemon=True).start()
    assert done.wait(20), "predict blocked: the stream kept the detector's lock"
    assert len(list(det.stream(frames, lossless=True))) == len(frames)


def _endless(frames):
    i = 0
    while True:
        yield frames[i % len(frames)]
        i += 1


def test_dropped_stream_ends_its_threads_and_frees_the_detector(onnx_bundle, frames):
    det = Detector.load(onnx_bundle)
    stream = det.stream(_endless(frames), lossless=True)
    stream.start()
    time.sleep(0.3)
    assert len(_stream_threads()) == 3
    del stream  # never closed, never iterated
    gc.collect()
    _wait_no_stream_threads()
    assert len(list(det.stream(frames, lossless=True))) == len(frames)


def test_a_second_concurrent_stream_is_a_clear_error(onnx_bundle, frames):
    det = Detector.load(onnx_bundle)
    with det.stream(_endless(frames)) as first:
        it = iter(first)
        next(it)
        with pytest.raises(RuntimeError, match="another stream of this detector is still running"):
            list(det.stream(frames))
    assert len(list(det.stream(frames))) == len(frames)


# -- 3: None from an iterable is a counted skip --------------------------------------------------------------------


def test_none_item_is_a_counted_skip_and_the_stream_goes_on(onnx_bundle, frames):
    det = Detector.load(onnx_bundle)
    stream = det.stream([frames[0], None, frames[1], None, frames[2]])
    results = list(stream)
    assert [r.frame_index for r in results] == [0, 2, 4]
    s = stream.stats
    assert s.captured == 5 and s.delivered == 3 and s.skipped == {"none_item": 2}
    assert [k["frame_index"] for k in s.skips] == [1, 3] and "None" in s.skips[0]["detail"]


# -- 4: non-finite outputs are faults, never "good" -----------------------------------------------------------------


def test_non_finite_outputs_raise_in_predict_and_are_counted_in_streams(onnx_bundle, frames):
    det = Detector.load(onnx_bundle)
    real = det.engine
    det.engine = NaNEngine(real, nan_score_at={1}, inf_map_at={2})
    with pytest.raises(NonFiniteOutputError, match=rf"bundle {onnx_bundle}.*non-finite result for frame \(score nan"):
        det.predict(frames[0])
    with pytest.raises(NonFiniteOutputError, match=r"for frame \(score [-0-9.e]+, 1 of 4096 map values NaN/inf"):
        det.predict(frames[0])
    det.engine = NaNEngine(real, nan_score_at={2})  # predict_batch: one engine call per frame (static batch 1)
    with pytest.raises(NonFiniteOutputError, match=r"frames\[1\]"):
        det.predict_batch(frames[:3])
    det.engine = NaNEngine(real, nan_score_at={2, 5}, inf_map_at={3})
    stream = det.stream(frames, lossless=True)
    results = list(stream)
    assert [r.frame_index for r in results] == [0, 3, 5, 6, 7]  # calls 2, 3, 5 = frames 1, 2, 4
    assert all(np.isfinite(r.score) and np.isfinite(r.raw_map).all() for r in results)
    s = stream.stats
    assert s.skipped == {"non_finite_output": 3} and s.delivered == 5 and s.captured == 8
    assert sorted(k["frame_index"] for k in s.skips) == [1, 2, 4]
    det.engine = real
    assert det.predict(frames[0]).is_anomalous is not None


# -- 5: manifest vs model, checked at load ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["onnx", "openvino"])
def test_manifest_model_mismatch_is_refused_at_load_naming_both(which, onnx_bundle, ov_bundle, tmp_path):
    src = onnx_bundle if which == "onnx" else ov_bundle
    engine = "onnxruntime" if which == "onnx" else "openvino"
    cases = {
        "input": ({"input": {**load_bundle(src).manifest.input.to_dict(), "height": 32, "width": 48}},
                  rf"the {engine} model has input 'images' \(1, 3, 64, 64\) float32; the manifest says "
                  r"\(1, 3, 32, 48\) float32"),
        "name": ({"outputs": [{"name": "heatmap", "shape": [1, 1, 64, 64], "dtype": "float32"},
                              {"name": "score", "shape": [1], "dtype": "float32"}]},
                 r"has no output 'heatmap' \(it has 'anomaly_map' \(1, 1, 64, 64\) float32, 'score' \(1\) float32\)"),
        "shape": ({"outputs": [{"name": "anomaly_map", "shape": [1, 1, 32, 32], "dtype": "float32"},
                               {"name": "score", "shape": [1], "dtype": "float32"}]},
                  r"has output 'anomaly_map' \(1, 1, 64, 64\) float32; the manifest says 'anomaly_map' \(1, 1, 32, 32\)"),
        "dtype": ({"outputs": [{"name": "anomaly_map", "shape": [1, 1, 64, 64], "dtype": "float32"},
                               {"name": "score", "shape": [1], "dtype": "float16"}]},
                  r"has output 'score' \(1\) float32; the manifest says 'score' \(1\) float16"),
    }
    for case, (changes, message) in cases.items():
        bundle = shutil.copytree(src, tmp_path / case)
        update_manifest(bundle, changes)
        with pytest.raises(BundleError, match=message):
            Detector.load(bundle)
    Detector.load(src)  # the untouched bundle loads


# -- 11: frame-size limit and model-resolution maps ---------------------------------------------------------------


def test_frame_size_limit_is_a_clear_error(onnx_bundle, frames):
    assert DEFAULT_MAX_FRAME_PIXELS == 8192 * 8192
    det = Detector.load(onnx_bundle)
    huge = np.zeros((8193, 8192), np.uint8)  # one row above the default (not touched: only its shape is read)
    with pytest.raises(ValueError, match="8192x8193 \\(WxH\\) = 67117056 pixels, above this detector's "
                                         "max_frame_pixels=67108864"):
        det.predict(huge, color_order="gray")
    small = Detector.load(onnx_bundle, max_frame_pixels=200 * 200)
    with pytest.raises(ValueError, match="frames\\[1\\] is 256x256 .* max_frame_pixels=40000"):
        small.predict_batch([frames[0][:150, :150], frames[1]])
    res = small.predict(frames[0], roi=(10, 20, 190, 200))  # a ROI inside the limit is fine
    assert res.raw_map.shape == (200, 190)
    stream = small.stream(frames[:2])
    assert list(stream) == [] and stream.stats.skipped == {"bad_frame": 2}
    with pytest.raises(ValueError, match="max_frame_pixels"):
        Detector.load(onnx_bundle, max_frame_pixels=0)


def test_model_resolution_maps_keep_verdict_and_frame_coordinate_regions(onnx_bundle, frames):
    full = Detector.load(onnx_bundle)
    model = Detector.load(onnx_bundle, map_resolution="model")
    roi = (16, 8, 224, 240)
    found = 0
    for frame in frames:
        for r in (None, roi):
            a, b = full.predict(frame, roi=r), model.predict(frame, roi=r)
            assert b.score == a.score and b.is_anomalous == a.is_anomalous
            assert b.raw_map.shape == b.anomaly_map.shape == b.defect_mask.shape == (64, 64)
            np.testing.assert_array_equal(b.raw_map, a.model_map)
            if not a.regions:
                continue
            found += 1
            # The largest region is the same defect, its box in frame pixels (ROI offset added).
            big_a, big_b = a.regions[0], b.regions[0]
            x0, y0 = max(big_a.x, big_b.x), max(big_a.y, big_b.y)
            x1, y1 = min(big_a.x + big_a.w, big_b.x + big_b.w), min(big_a.y + big_a.h, big_b.y + big_b.h)
            inter = max(0, x1 - x0) * max(0, y1 - y0)
            union = big_a.w * big_a.h + big_b.w * big_b.h - inter
            assert inter / union > 0.6, (big_a, big_b)
            assert 0.6 < big_b.area_px / big_a.area_px < 1.6
            fx, fy = (r[0], r[1]) if r else (0, 0)
            fw, fh = (r[2], r[3]) if r else frame.shape[1::-1]
            assert fx <= big_b.x and big_b.x + big_b.w <= fx + fw and fy <= big_b.y and big_b.y + big_b.h <= fy + fh
    assert found >= 3  # real defects found at both resolutions
    streamed = list(model.stream(frames[:2]))
    assert streamed[0].raw_map.shape == (64, 64) and streamed[0].score == full.predict(frames[0]).score
    with pytest.raises(ValueError, match="map_resolution"):
        Detector.load(onnx_bundle, map_resolution="half")


# -- 6: degenerate and live calibration ---------------------------------------------------------------------------


def test_identical_good_frames_warn_and_floor_the_threshold(onnx_bundle, frames, tmp_path):
    bundle = shutil.copytree(onnx_bundle, tmp_path / "b")
    good = frames[0]
    with pytest.warns(UserWarning, match="near-zero score spread"):
        report = calibrate_bundle(bundle, [good.copy() for _ in range(25)], 0.01, progress=False)
    det = Detector.load(bundle)
    score = det.predict(good).score
    t = report.thresholds
    assert t.image_threshold == pytest.approx(score + MIN_MARGIN, abs=1e-4)
    floor = load_bundle(bundle).thresholds.details["margin_floor"]
    assert floor["degenerate"] is True and floor["image_floored"] is True and floor["min_margin"] == MIN_MARGIN
    brighter = np.clip(good.astype(np.int16) + 1, 0, 255).astype(np.uint8)  # one grey level more
    assert det.predict(brighter).is_anomalous is False and det.predict(good).is_anomalous is False


def test_real_good_frames_are_not_floored(onnx_bundle, real_root, tmp_path):
    bundle = shutil.copytree(onnx_bundle, tmp_path / "b")
    folder = real_root / CATEGORY / "train" / "good"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no degenerate warning on real frames
        report = calibrate_bundle(bundle, folder, 0.05, max_frames=40, progress=False)
    floor = report.thresholds.details["margin_floor"]
    assert not floor["degenerate"] and not floor["image_floored"] and not floor["pixel_floored"]
    assert floor["score_std"] > 0.3


class LiveCamera(FrameSource):
    """A live source that never ends (what a camera is)."""

    live = True
    name = "camera:fake"

    def __init__(self, frame):
        super().__init__()
        self.frame, self.reads = frame, 0

    def read(self):
        self.reads += 1
        return self.frame


def test_live_calibration_needs_a_frame_budget(onnx_bundle, frames, tmp_path):
    bundle = shutil.copytree(onnx_bundle, tmp_path / "b")
    cam = LiveCamera(frames[0])
    with pytest.raises(ValueError, match="camera:fake is a live source.*max_frames"):
        calibrate_bundle(bundle, cam, 0.05, progress=False)
    assert cam.reads == 0
    with pytest.warns(UserWarning, match="near-zero score spread"):
        report = calibrate_bundle(bundle, cam, 0.05, max_frames=20, progress=False, save=False)
    assert report.num_frames == 20 and cam.reads == 20
    rc = main(["calibrate", str(bundle), "--source", "0"])  # camera 0: refused before it is opened
    assert rc == 2


def test_pixel_sample_is_bounded_and_stratified():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(64, 64)).astype(np.float32) + i * 0.01 for i in range(100)]
    exact = PixelSample(budget=10**9)
    bounded = PixelSample(budget=20_000)
    for m in maps:
        exact.add(m)
        bounded.add(m)
    assert exact.array().shape == (100, 1, 4096)  # everything fits: every pixel, exact thresholds
    b = bounded.array()
    assert b.shape[0] == 100 and b.size <= 20_000 and b.shape[2] == 128  # 4096 halved 5 times
    assert abs(np.quantile(b, 0.99) - np.quantile(exact.array(), 0.99)) < 0.15
    for row, m in zip(b[:, 0], maps):
        assert np.isin(row, m).all()  # real pixels of that frame


# -- 12: CLI and messages -----------------------------------------------------------------------------------------


def test_cli_run_exits_non_zero_when_every_frame_was_skipped(onnx_bundle, real_root, tmp_path, capsys):
    folder = real_root / CATEGORY / "test" / "good"
    rc = main(["run", str(onnx_bundle), "--source", str(folder), "--roi", "0,0,999,999", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "every one of the 2 frames" in err and "lies outside the 256x256" in err
    rc = main(["run", str(onnx_bundle), "--source", str(folder), "--color-order", "gray", "--no-progress"])
    assert rc == 1 and "color_order='gray'" in capsys.readouterr().err
    # a negative number after an option is its value, not an option
    rc = main(["run", str(onnx_bundle), "--source", str(folder), "--roi", "-1,0,10,10", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "expected one argument" not in err and "(-1, 0, 10, 10) lies outside" in err
    rc = main(["run", str(onnx_bundle), "--source", str(folder), "--no-progress"])
    assert rc == 0
    rc = main(["run", str(onnx_bundle), "--source", str(folder), "--save", str(tmp_path / "missing" / "out.avi"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "folder" in err and "does not exist" in err and "encoder" not in err


@pytest.mark.parametrize("size, message", [("abc", "image size must be N or HxW"), ("0x0", "must be positive")])
def test_cli_benchmark_frame_size_errors(onnx_bundle, size, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["benchmark", str(onnx_bundle), "--frame-size", size])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err


def test_benchmark_of_nothing_is_an_error_not_a_table_of_nan(onnx_bundle):
    from edge_ad.runtime.benchmark import benchmark

    with pytest.raises(ValueError, match="frame_size"):
        benchmark(onnx_bundle, frame_size=(0, 0), progress=False)
    with pytest.raises(RuntimeError, match="benchmark measured nothing: every one of the 2 frames"):
        benchmark(onnx_bundle, [np.zeros((8, 8, 4), np.uint8)] * 3, warmup=0, iterations=2, progress=False)


def test_deeply_nested_manifest_is_a_bundle_error(onnx_bundle, tmp_path):
    bundle = shutil.copytree(onnx_bundle, tmp_path / "deep")
    path = bundle / "manifest.yaml"
    path.write_text(path.read_text() + "junk: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(bundle)


def test_predict_batch_roi_errors_name_the_frame(onnx_bundle, frames):
    det = Detector.load(onnx_bundle)
    with pytest.raises(ValueError, match=r"outside the 256x256 \(WxH\) frames\[1\]"):
        det.predict_batch(frames[:2], roi=[(0, 0, 10, 10), (250, 0, 10, 10)])
    with pytest.raises(TypeError, match=r"the roi of frames\[2\] must be a tuple of four ints"):
        det.predict_batch(frames[:3], roi=[None, None, (1, 2, 3)])
    with pytest.raises(ValueError, match=r"the roi of frames\[0\]: width and height must be positive"):
        det.predict_batch(frames[:1], roi=[(0, 0, 0, 5)])


def test_third_party_info_logs_go_to_the_file_not_the_console(tmp_path):
    import io

    from edge_ad.logs import third_party_logs

    # "The console" is a handler of our own on NNCF's logger: NNCF's stdout handler is bound to
    # whatever sys.stdout was when nncf was first imported, which under pytest is an earlier test's
    # capture, so capfd cannot see it reliably in a full run.
    pytest.importorskip("nncf")  # NNCF's own Logger subclass, before the logger is taken
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.addHandler(handler)
    nncf_logger.setLevel(logging.INFO)
    try:
        with third_party_logs(tmp_path / "convert.log") as log:
            nncf_logger = logging.getLogger("nncf")
            nncf_logger.info("Not adding activation input quantizer for operation: 7 conv")
            nncf_logger.warning("a real NNCF warning")
        text = console.getvalue()
        assert "Not adding activation input quantizer" not in text and "a real NNCF warning" in text
        logged = log.read_text()
        assert "Not adding activation input quantizer" in logged and "a real NNCF warning" in logged
        nncf_logger.info("after the block: the console again")
        assert "after the block" in console.getvalue()
    finally:
        nncf_logger.removeHandler(handler)
        nncf_logger.setLevel(level)


def test_cli_convert_keeps_nncf_info_off_the_console(knn_run, real_root, tmp_path, capfd):
    out = tmp_path / "ov"
    assert main(["convert", str(knn_run), "--target", "intel-cpu", "--precision", "int8", "--calib",
                 str(real_root / CATEGORY), "--calib-count", "8", "--out", str(out)]) == 0
    captured = capfd.readouterr()
    console = captured.out + captured.err
    log = tmp_path / "ov.convert.log"
    assert "INFO:nncf" not in console and f"go to {log}" in console and "[convert] bundle written" in console
    assert "INFO nncf: Not adding activation input quantizer" in log.read_text()
    assert load_bundle(out).manifest.precision == "int8"  # beside the bundle, not inside it
