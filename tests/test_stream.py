"""Detector.stream: the threaded pipeline on real frames: equality with predict, bounded queues under a
slow consumer, exact drop accounting, bad frames, source loss + reconnect, and clean shutdown."""
from __future__ import annotations

import _thread
import threading
import time

import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.data import MVTecDataset
from edge_ad.runtime import Detector, read_image
from edge_ad.runtime.sources import FrameSource, SourceError
from edge_ad.runtime.stream import ReconnectPolicy, StreamError

CATEGORY = "mvtec_hazelnut_256"
FAST = ReconnectPolicy(initial_delay=0.01, factor=2.0, max_delay=0.05, max_attempts=3)


@pytest.fixture(scope="module")
def onnx_det(onnx_bundle):
    return Detector.load(onnx_bundle)


@pytest.fixture(scope="module")
def ov_det(knn_run, real_root, tmp_path_factory):
    # No validation data (fewer seconds): this bundle only checks the OpenVINO async path.
    path = convert(knn_run, "intel-cpu", tmp_path_factory.mktemp("stream_b") / "ov", precision="fp32",
                   calib_count=8, progress=False)
    return Detector.load(path)


@pytest.fixture(scope="module")
def frames(real_root):
    """Real test images (good and defective) as an OpenCV camera delivers them (BGR uint8)."""
    return [read_image(s.path, "bgr") for s in list(MVTecDataset(real_root, CATEGORY, "test"))[:10]]


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


def _no_new_threads(baseline: set[threading.Thread]) -> None:
    new = [t for t in threading.enumerate() if t not in baseline]
    assert not new, f"threads left running: {new}"


def _small(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("which", ["onnx", "openvino"])
def test_stream_results_equal_predict(which, onnx_det, ov_det, frames):
    det = onnx_det if which == "onnx" else ov_det
    before = time.monotonic()
    with det.stream(frames) as stream:
        results = list(stream)
    assert stream.mode == "lossless"  # default for an iterable
    assert [r.frame_index for r in results] == list(range(len(frames)))
    for frame, res in zip(frames, results):
        ref = det.predict(frame)
        np.testing.assert_array_equal(res.model_map, ref.model_map)
        np.testing.assert_array_equal(res.raw_map, ref.raw_map)
        np.testing.assert_array_equal(res.anomaly_map, ref.anomaly_map)
        assert res.score == ref.score and res.is_anomalous == ref.is_anomalous and res.regions == ref.regions
        assert res.source == stream.source.name and res.frame is None
        assert set(res.timings) == {"capture", "preprocess", "infer", "postprocess", "capture_to_decision"}
        assert before <= res.capture_time <= time.monotonic()
        assert abs(res.capture_wall_time - time.time()) < 60
    stamps = [r.capture_time for r in results]
    assert stamps == sorted(stamps)
    if det.pixel_threshold is not None:
        assert any(r.regions for r in results)  # real defects are found through the stream too
    s = stream.stats
    assert (s.captured, s.processed, s.delivered, s.dropped_total, s.skipped_total) == (10, 10, 10, 0, 0)
    # ROI and keep_frames
    roi = (20, 30, 150, 120)
    res = next(iter(det.stream(frames[:1], roi=roi, keep_frames=True)))
    ref = det.predict(frames[0], roi=roi)
    np.testing.assert_array_equal(res.raw_map, ref.raw_map)
    assert res.roi == roi and res.frame is frames[0]


def test_engine_async_contract(onnx_det, ov_det, frames):
    from edge_ad.runtime import preprocess_batch

    for det in (onnx_det, ov_det):
        eng = det.engine
        assert eng.num_slots == 3 and eng.version
        x = [preprocess_batch([f], det.spec) for f in frames[:3]]
        with det._lock:
            eng.input_buffer(1)[:1] = x[0]
            sync = eng.run(1)
            for slot in range(3):  # all three slots in flight at once, each with its own input
                eng.slot_buffer(slot, 1)[:1] = x[slot]
                eng.start(slot, 1)
            with pytest.raises(RuntimeError, match="in flight"):
                eng.start(1, 1)
            outs = [eng.wait(slot) for slot in range(3)]
            with pytest.raises(RuntimeError, match="start"):
                eng.wait(0)
            with pytest.raises(ValueError, match="slot"):
                eng.slot_buffer(3, 1)
        np.testing.assert_array_equal(outs[0][0], sync[0])
        np.testing.assert_array_equal(outs[0][1], sync[1])
        for slot in range(3):
            ref = det.predict(frames[slot])
            np.testing.assert_array_equal(outs[slot][0][0], ref.model_map)
            assert outs[slot][0].shape == (1, 64, 64) and outs[slot][1].shape == (1,)
            assert float(outs[slot][1][0]) == ref.score


def test_slow_consumer_line_speed_drops_and_stays_bounded(onnx_det):
    baseline = _threads()
    n = 300
    delivered = []
    with onnx_det.stream(_small(n), lossless=False, queue_size=2) as stream:
        for res in stream:
            delivered.append(res.frame_index)
            live = stream.stats.queues
            assert all(q["max_depth"] <= q["bound"] for q in live.values()), live
            time.sleep(0.01)  # a consumer much slower than the source
    s = stream.stats
    assert s.mode == "line-speed" and s.captured == n and s.skipped_total == 0
    assert s.dropped.get("stale_frame", 0) > 0 and s.delivered < n
    assert s.delivered + s.dropped_total == s.captured  # every captured frame accounted for exactly once
    assert s.processed == s.delivered + s.dropped.get("slow_consumer", 0) + s.dropped.get("shutdown", 0)
    assert delivered == sorted(delivered) and len(set(delivered)) == len(delivered)
    assert s.queues["frames"]["bound"] == 2 and s.queues["frames"]["max_depth"] <= 2
    assert s.queues["results"]["max_depth"] <= 2 and s.queues["slots"]["max_depth"] <= 2
    _no_new_threads(baseline)


def test_slow_consumer_lossless_keeps_every_frame_in_order(onnx_det):
    baseline = _threads()
    n = 60
    got = []
    stream = onnx_det.stream(_small(n, seed=1), lossless=True, queue_size=1)
    for res in stream:
        got.append(res.frame_index)
        time.sleep(0.005)
    s = stream.stats
    assert got == list(range(n))
    assert (s.captured, s.processed, s.delivered, s.dropped_total) == (n, n, n, 0)
    assert s.queues["frames"]["max_depth"] == 1 and s.queues["results"]["max_depth"] == 1  # back-pressure, bound 1
    _no_new_threads(baseline)


def test_bad_frames_are_reported_skips(onnx_det):
    good = _small(3, seed=2)
    items = [good[0], good[0].astype(np.float32), np.zeros((8, 8, 2), np.uint8), good[1],
             np.zeros((0, 8, 3), np.uint8), np.zeros((1, 1, 3), np.uint8), [[1, 2]], np.zeros((8, 8, 4), np.uint8),
             good[2]]
    stream = onnx_det.stream(items)
    results = list(stream)
    assert [r.frame_index for r in results] == [0, 3, 8]
    for r, f in zip(results, good):
        assert r.score == onnx_det.predict(f).score
    s = stream.stats
    assert s.captured == 9 and s.delivered == 3 and s.skipped == {"bad_frame": 6} and s.dropped_total == 0
    details = {k["frame_index"]: k["detail"] for k in s.skips}
    assert "dtype float32" in details[1] and "shape" in details[2] and "empty" in details[4]
    assert "at least 2x2" in details[5] and "numpy" in details[6] and "4 channels" in details[7]
    assert sum(e.kind == "skip" for e in stream.events) == 6
    # Detector.predict keeps raising on the same frames.
    with pytest.raises(TypeError, match="uint8"):
        onnx_det.predict(items[1])


def test_iterator_raising_ends_with_clear_error(onnx_det):
    baseline = _threads()

    def frames():
        yield from _small(3, seed=3)
        raise OSError("USB frame grabber vanished")

    got = []
    with pytest.raises(StreamError, match="USB frame grabber vanished") as info:
        for res in onnx_det.stream(frames()):
            got.append(res.frame_index)
    assert got == [0, 1, 2]  # the frames before the loss are delivered, then the error
    assert "cannot be re-opened" in str(info.value)
    _no_new_threads(baseline)


class FlakyCamera(FrameSource):
    """A live camera that fails after ``fail_after`` frames and re-opens only after ``refuse`` failed opens."""

    live = True
    reopenable = True

    def __init__(self, frames, fail_after, refuse):
        super().__init__()
        self.name, self.frames, self.fail_after, self.refuse = "flaky", frames, fail_after, refuse
        self.opens = self.reads = 0

    def open(self):
        self.opens += 1
        if self.opens > 1 and self.refuse > 0:
            self.refuse -= 1
            raise SourceError("no device at /dev/video9")

    def read(self):
        self.reads += 1
        if self.reads == self.fail_after + 1:
            raise SourceError("VIDIOC_DQBUF: No such device")
        if self.reads > len(self.frames) + 1:
            return None
        time.sleep(0.002)  # a camera's frame period
        return self.frames[(self.reads - 1) % len(self.frames)]


def test_camera_loss_reconnects_with_backoff(onnx_det):
    baseline = _threads()
    cam = FlakyCamera(_small(12, seed=4), fail_after=5, refuse=2)
    stream = onnx_det.stream(cam, reconnect=FAST, lossless=True)
    results = list(stream)
    kinds = [e.kind for e in stream.events]
    assert kinds.count("source_lost") == 1 and kinds.count("reconnect_attempt") == 3
    assert kinds.count("reconnect_failed") == 2 and kinds.count("reconnected") == 1
    assert stream.stats.reconnects == 1 and stream.stats.error is None
    assert len(results) == 12 and [r.frame_index for r in results] == list(range(12))
    assert FAST.delay(1) == 0.01 and FAST.delay(2) == 0.02 and FAST.delay(4) == 0.05  # capped
    _no_new_threads(baseline)


def test_camera_gone_for_good_gives_up(onnx_det):
    baseline = _threads()
    cam = FlakyCamera(_small(12, seed=5), fail_after=4, refuse=99)
    stream = onnx_det.stream(cam, reconnect=FAST)
    assert stream.mode == "line-speed"  # default for a live source
    got = []
    t0 = time.monotonic()
    with pytest.raises(StreamError, match="gave up on source flaky after 3 reconnect attempts") as info:
        for res in stream:
            got.append(res)
    assert time.monotonic() - t0 < 10
    assert "No such device" in str(info.value) or "no device" in str(info.value)
    assert len(got) <= 4 and stream.stats.error is not None
    assert [e.kind for e in stream.events].count("gave_up") == 1
    with pytest.raises(StreamError, match="reconnect is off"):
        list(onnx_det.stream(FlakyCamera(_small(3), fail_after=1, refuse=0), reconnect=False))
    _no_new_threads(baseline)


def _endless():
    rng = np.random.default_rng(6)
    pool = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(4)]
    i = 0
    while True:
        yield pool[i % 4]
        i += 1


def test_shutdown_joins_threads_on_break_close_with_and_ctrl_c(onnx_det):
    baseline = _threads()
    # break out of the loop (the generator is closed when the loop drops it)
    stream = onnx_det.stream(_endless(), lossless=False)
    for k, _ in enumerate(stream):
        if k == 5:
            break
    _no_new_threads(baseline)
    s = stream.stats
    assert not s.running and s.captured == s.delivered + s.dropped_total
    # close() from the consumer, mid-stream
    stream = onnx_det.stream(_endless(), lossless=True)
    it = iter(stream)
    next(it)
    stream.close()
    _no_new_threads(baseline)
    s = stream.stats
    assert s.captured == s.delivered + s.dropped_total and s.delivered == 1
    # with-block exit through an exception
    with pytest.raises(ZeroDivisionError):
        with onnx_det.stream(_endless()) as stream:
            for _ in stream:
                1 / 0
    _no_new_threads(baseline)
    # Ctrl-C: KeyboardInterrupt delivered to the main thread while it waits on the stream
    stream = onnx_det.stream(_endless(), lossless=True)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            time.sleep(0.001)
    timer.join()
    _no_new_threads(baseline)
    with pytest.raises(RuntimeError, match="once"):
        iter(stream)


def test_predict_works_while_streaming(onnx_det, frames):
    ref = onnx_det.predict(frames[0])
    with onnx_det.stream(_endless(), lossless=False) as stream:
        for k, _ in enumerate(stream):
            np.testing.assert_array_equal(onnx_det.predict(frames[0]).raw_map, ref.raw_map)  # slot 0, under the lock
            if k == 3:
                break


def test_stream_argument_errors(onnx_det):
    with pytest.raises(ValueError, match="queue_size"):
        onnx_det.stream([], queue_size=0)
    with pytest.raises(ValueError, match="max_frames"):
        onnx_det.stream([], max_frames=0)
    with pytest.raises(TypeError, match="reconnect"):
        onnx_det.stream([], reconnect="yes")
    with pytest.raises(TypeError, match="roi"):
        onnx_det.stream([], roi=(1, 2, 3))
    with pytest.raises(ValueError, match="max_attempts"):
        ReconnectPolicy(max_attempts=0)
    stream = onnx_det.stream(_small(10), max_frames=4)
    assert len(list(stream)) == 4 and stream.stats.captured == 4


def test_reduction_factor_choice_and_reduced_read(real_root):
    from edge_ad.runtime.image_io import reduction_factor

    assert reduction_factor((460, 1130), (224, 224)) == 2  # the bsdata_pitting frames, 224 px model
    assert reduction_factor((460, 1130), (64, 64)) == 4  # 1/8 would give 57 rows < 64
    assert reduction_factor((256, 256), (64, 64)) == 4
    assert reduction_factor((256, 256), (256, 256)) == 1 and reduction_factor((300, 900), (200, 64)) == 1
    assert reduction_factor((4000, 4000), (224, 224)) == 8  # OpenCV offers no factor above 8
    with pytest.raises(ValueError, match="positive"):
        reduction_factor((0, 10), (4, 4))
    path = sorted((real_root / "bsdata_pitting" / "test" / "good").iterdir())[0]
    full = read_image(path, "bgr")
    for f in (2, 4, 8):
        assert read_image(path, "bgr", f).shape == (-(-full.shape[0] // f), -(-full.shape[1] // f), 3)
    with pytest.raises(ValueError, match="reduce must be one of"):
        read_image(path, "bgr", 3)


@pytest.mark.parametrize("folder", ["bsdata_pitting/test/good", "bsdata_pitting/test/pitting"])
def test_reduced_decode_same_verdicts_near_scores(onnx_det, real_root, folder):
    """Folder frames decoded at 1/4 (or 1/8) size (64 px model) give the full decode's verdicts and
    scores within a few per cent, maps at the stored frame's size; results say the factor; a ROI
    turns reduction off."""
    src = str(real_root / folder)
    runs = {}
    for red in (False, True):
        with onnx_det.stream(src, reduced_decode=red, keep_frames=True, max_frames=12) as s:
            runs[red] = list(s)
    full, red = runs[False], runs[True]
    assert len(full) == len(red) >= 2
    # the factor is chosen per file from its header: 1/8 for the larger pitting crops still keeps 64 rows
    assert {r.decode_scale for r in full} == {1} and 4 in {r.decode_scale for r in red} <= {4, 8}
    assert all(r.frame.shape[0] == -(-f.frame.shape[0] // r.decode_scale) for r, f in zip(red, full))
    assert all(r.raw_map.shape == f.raw_map.shape == f.frame.shape[:2] for r, f in zip(red, full))  # frame pixels
    assert [r.is_anomalous for r in red] == [f.is_anomalous for f in full]
    a, b = np.array([f.score for f in full]), np.array([r.score for r in red])
    # near the decision boundary is what matters: errors relative to the image threshold
    err = np.abs(a - b) / onnx_det.image_threshold
    assert np.median(err) < 0.05 and np.max(err) < 0.1
    with onnx_det.stream(src, reduced_decode=True, roi=(0, 0, 128, 128), max_frames=2) as s:
        assert {r.decode_scale for r in s} == {1}  # ROI pixels refer to the full frame: never reduced


def test_cycled_folder_keeps_reduced_decode_across_passes(real_root, tmp_path):
    import shutil

    from edge_ad.runtime.benchmark import CycledSource

    for p in sorted((real_root / "bsdata_pitting" / "test" / "good").iterdir())[:2]:  # two 460x1130 JPEGs
        shutil.copy(p, tmp_path / p.name)
    src = CycledSource(str(tmp_path), 5)  # 2 files: 3 passes
    assert src.reduce_decode((64, 64))
    src.open()
    shapes = []
    while (frame := src.read()) is not None:
        shapes.append((frame.shape, src.last_scale, src.last_size))
    src.close()
    assert shapes == [((115, 283, 3), 4, (460, 1130))] * 5
