"""Many cameras on one Detector: multi-source streams (four video files made from real images),
per-source accounting in lossless and line-speed modes, a camera that fails and comes back while the
others keep delivering, and the round-robin FairQueue the pipeline schedules with."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.data import MVTecDataset
from edge_ad.runtime import Detector, read_image
from edge_ad.runtime.fair_queue import CLOSED, FairQueue
from edge_ad.runtime.sources import FrameSource, SourceError
from edge_ad.runtime.stream import ReconnectPolicy, StreamError, split_sources

CATEGORY = "mvtec_hazelnut_256"
FAST = ReconnectPolicy(initial_delay=0.01, factor=2.0, max_delay=0.05, max_attempts=3)
CAMS = ("cam_top", "cam_side", "cam_end", "cam_back")


@pytest.fixture(scope="module")
def det(onnx_bundle):
    return Detector.load(onnx_bundle)


@pytest.fixture(scope="module")
def images(real_root):
    """Real hazelnut test shots (good and defective), BGR uint8 as OpenCV decodes them."""
    return [read_image(s.path, "bgr") for s in MVTecDataset(real_root, CATEGORY, "test")]


@pytest.fixture(scope="module")
def videos(images, tmp_path_factory):
    """Four MJPG videos standing in for four cameras: 6, 5, 4 and 3 frames of real shots (cycled)."""
    import cv2

    folder = tmp_path_factory.mktemp("multicam_videos")
    paths, start = {}, 0
    for cam, n in zip(CAMS, (6, 5, 4, 3)):
        path = folder / f"{cam}.avi"
        h, w = images[0].shape[:2]
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (w, h))
        assert writer.isOpened()
        for k in range(start, start + n):
            writer.write(images[k % len(images)])
        writer.release()
        paths[cam], start = str(path), start + n
    return paths


def _accounted(s) -> bool:
    return s.captured == s.delivered + s.dropped_total + s.skipped_total


def _no_new_threads(baseline: set[threading.Thread]) -> None:
    new = [t for t in threading.enumerate() if t not in baseline]
    assert not new, f"threads left running: {new}"


def test_four_video_cameras_lossless_every_frame_accounted(det, videos):
    baseline = set(threading.enumerate())
    with det.stream(videos, keep_frames=True) as stream:
        results = list(stream)
    assert stream.mode == "lossless" and list(stream.sources) == list(CAMS)
    by_cam = {cam: [r for r in results if r.source == cam] for cam in CAMS}
    assert {cam: len(r) for cam, r in by_cam.items()} == dict(zip(CAMS, (6, 5, 4, 3)))
    for cam, rs in by_cam.items():
        assert [r.frame_index for r in rs] == list(range(len(rs)))  # in order within a camera
        assert [r.capture_time for r in rs] == sorted(r.capture_time for r in rs)
    for res in results[::3]:  # the shared pipeline gives what predict gives for the same decoded frame
        ref = det.predict(res.frame)
        np.testing.assert_array_equal(res.model_map, ref.model_map)
        assert res.score == ref.score and res.is_anomalous == ref.is_anomalous and res.regions == ref.regions
    s = stream.stats
    assert set(s.sources) == set(CAMS)
    for cam, n in zip(CAMS, (6, 5, 4, 3)):
        cs = s.sources[cam]
        assert (cs.captured, cs.processed, cs.delivered, cs.dropped_total, cs.skipped_total) == (n, n, n, 0, 0)
        assert cs.queues["frames"]["max_depth"] <= cs.queues["frames"]["bound"] == 2
    assert (s.captured, s.delivered) == (18, 18) and _accounted(s) and s.error is None
    assert s.batch == 1 and s.batches == 18 and s.batch_fill == 1.0
    _no_new_threads(baseline)


def test_line_speed_slow_consumer_drops_per_camera_and_starves_none(det, videos):
    with det.stream({cam: path for cam, path in videos.items()}, lossless=False, queue_size=1) as stream:
        results = []
        for res in stream:
            results.append(res)
            time.sleep(0.03)  # a consumer slower than four file "cameras"
    s = stream.stats
    assert s.mode == "line-speed"
    for cam in CAMS:
        cs = s.sources[cam]
        assert _accounted(cs), (cam, cs)
        assert cs.delivered >= 1, f"{cam} starved: {cs}"  # fair scheduling: every camera gets the engine
        assert cs.queues["frames"]["max_depth"] <= 1
    assert s.dropped_total > 0 and _accounted(s)  # the consumer was too slow: drops, counted per camera
    assert sum(sum(cs.dropped.values()) for cs in s.sources.values()) == s.dropped_total
    assert s.queues["results"]["max_depth"] <= s.queues["results"]["bound"] == 4


class FlakyCamera(FrameSource):
    """A live camera that loses its link after ``fail_after`` frames and re-opens after ``refuse`` failed opens."""

    live = True
    reopenable = True

    def __init__(self, name, frames, fail_after, refuse):
        super().__init__()
        self.name, self.frames, self.fail_after, self.refuse = name, frames, fail_after, refuse
        self.opens = self.reads = 0

    def open(self):
        self.opens += 1
        if self.opens > 1 and self.refuse > 0:
            self.refuse -= 1
            raise SourceError(f"no device for {self.name}")

    def read(self):
        self.reads += 1
        if self.reads == self.fail_after + 1:
            raise SourceError("VIDIOC_DQBUF: No such device")
        if self.reads > len(self.frames) + 1:
            return None
        time.sleep(0.002)  # a camera's frame period
        return self.frames[(self.reads - 1) % len(self.frames)]


def test_camera_killed_mid_stream_reconnects_while_others_deliver(det, videos, images):
    flaky = FlakyCamera("cam_flaky", images[:8], fail_after=3, refuse=2)
    sources = {"cam_top": videos["cam_top"], "cam_side": videos["cam_side"], "cam_flaky": flaky}
    stream = det.stream(sources, reconnect=FAST, lossless=True)
    results = list(stream)
    s = stream.stats
    assert s.error is None and s.sources["cam_flaky"].reconnects == 1
    assert s.sources["cam_top"].reconnects == 0 and s.sources["cam_side"].reconnects == 0
    assert [r.frame_index for r in results if r.source == "cam_flaky"] == list(range(8))
    assert sum(r.source == "cam_top" for r in results) == 6 and sum(r.source == "cam_side" for r in results) == 5
    flaky_events = [e.kind for e in stream.events if e.source == "cam_flaky"]
    assert flaky_events.count("source_lost") == 1 and flaky_events.count("reconnected") == 1
    assert not any(e.kind == "source_lost" for e in stream.events if e.source != "cam_flaky")
    assert all(_accounted(cs) for cs in s.sources.values()) and _accounted(s)


def test_camera_gone_for_good_does_not_stop_the_others(det, videos, images):
    dead = FlakyCamera("cam_dead", images[:8], fail_after=2, refuse=99)
    stream = det.stream({"cam_top": videos["cam_top"], "cam_dead": dead}, reconnect=FAST, lossless=True)
    got = []
    with pytest.raises(StreamError, match="gave up on source cam_dead"):
        for res in stream:
            got.append(res)
    assert sum(r.source == "cam_top" for r in got) == 6  # every frame of the healthy camera came through
    assert sum(r.source == "cam_dead" for r in got) == 2
    s = stream.stats
    assert s.sources["cam_top"].error is None and "cam_dead" in s.sources["cam_dead"].error
    assert all(_accounted(cs) for cs in s.sources.values())


def test_split_sources_tells_cameras_from_frames(images, videos):
    assert split_sources(images[:2]) == [(None, images[:2])]  # a list of frames is one source
    assert split_sources([0, "rtsp://x/1"]) == [(None, 0), (None, "rtsp://x/1")]
    assert split_sources({"a": 0, "b": 1}) == [("a", 0), ("b", 1)]
    with pytest.raises(TypeError, match="non-empty strings"):
        split_sources({"": 0})
    with pytest.raises(ValueError, match="empty"):
        split_sources({})


def test_list_of_sources_is_named_by_source_and_deduplicated(det, videos):
    path = videos["cam_end"]
    stream = det.stream([path, path])
    assert list(stream.sources) == [path, f"{path}#1"]
    assert len(list(stream)) == 8 and stream.stats.sources[f"{path}#1"].delivered == 4


def test_fair_queue_round_robin_per_lane_drops_and_batches():
    q = FairQueue(3, maxsize=2)
    for lane, items in ((0, "abc"), (1, "xy"), (2, "p")):
        for it in items:
            q.put(lane, it, drop_oldest=True)
    assert q.max_depth == [2, 2, 1]  # lane 0 dropped its own oldest ("a"), not another lane's
    assert q.get_batch(4) == ["b", "x", "p", "c"]  # round-robin, one per lane per pass
    assert q.get_batch(4, wait_s=0.01) == ["y"]  # the wait is bounded; fewer frames are returned
    # Frames of one batch share a key (e.g. a colour order); the others stay queued.
    q.put(0, ("rgb", 1), drop_oldest=False)
    q.put(1, ("bgr", 2), drop_oldest=False)
    q.put(2, ("rgb", 3), drop_oldest=False)
    # Lane 1 was served last, so lane 2 comes first; lane 1's "bgr" frame does not join the batch.
    assert q.get_batch(3, key=lambda it: it[0]) == [("rgb", 3), ("rgb", 1)]
    assert q.get_batch(3) == [("bgr", 2)]
    q.close_lane(0)
    assert q.put(0, "late", drop_oldest=True)[0] is False
    q.close()
    assert q.get_batch(2) is CLOSED


def test_batch_wait_ms_is_checked(det, videos):
    with pytest.raises(ValueError, match="batch_wait_ms"):
        det.stream(videos, batch_wait_ms=-1)


def test_cli_run_named_sources_writes_per_camera_records(det, videos, tmp_path, capsys):
    import json

    from edge_ad.cli.main import main

    out = tmp_path / "r.jsonl"
    rc = main(["run", str(det.bundle.source), "--source", f"cam_top={videos['cam_top']}", "--source",
               f"cam_side={videos['cam_side']}", "--jsonl", str(out), "--no-progress", "--batch-wait-ms", "1"])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    records, stats = lines[:-1], lines[-1]["stats"]
    assert sorted(r["source"] for r in records) == ["cam_side"] * 5 + ["cam_top"] * 6
    assert stats["sources"]["cam_top"]["delivered"] == 6 and stats["sources"]["cam_side"]["delivered"] == 5
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["sources"]["cam_side"]["captured"] == 5 and summary["delivered"] == 11


def test_named_sources_parsing():
    import argparse

    from edge_ad.cli._parse import named_sources

    assert named_sources(["0"]) == 0 and named_sources(["rtsp://h/s?a=1"]) == "rtsp://h/s?a=1"
    assert named_sources(["cam_top=0", "cam_side=rtsp://h/s?a=1"]) == {"cam_top": 0, "cam_side": "rtsp://h/s?a=1"}
    gst = "v4l2src device=/dev/video0 ! videoconvert ! appsink"
    assert named_sources([gst]) == gst and named_sources(["a=1", gst]) == {"a": 1, "cam1": gst}
    assert named_sources(["cam_top=0"]) == {"cam_top": 0}  # one named camera keeps its name (its profile)
    with pytest.raises(argparse.ArgumentTypeError, match="twice"):
        named_sources(["a=0", "a=1"])


def test_benchmark_four_cameras_cycles_files_and_reports_per_camera(det, videos):
    from edge_ad.runtime.benchmark import benchmark, format_report

    rep = benchmark(det, videos["cam_back"], warmup=4, iterations=36, sources=4, progress=False)
    assert rep["frames"] == 36 and set(rep["sources"]) == {"cam0", "cam1", "cam2", "cam3"}
    assert sum(c["delivered"] for c in rep["sources"].values()) == 36
    assert rep["end_to_end_fps"] > 0 and all(c["fps"] > 0 for c in rep["sources"].values())
    assert rep["captured"] == 40  # the 3-frame video, cycled: 10 frames per camera
    assert rep["batch"] == 1 and rep["batch_fill"] == 1.0
    table = format_report(rep)
    assert "cam3" in table and "c2d p99 ms" in table and "batch fill" in table
    with pytest.raises(ValueError, match="sources must be"):
        benchmark(det, None, sources=0, progress=False)


@pytest.fixture(scope="module")
def ov_int8(knn_run, tmp_path_factory):
    """intel-cpu INT8 bundles of the same run at static batch 1 and 4 (same calibration set)."""
    out = tmp_path_factory.mktemp("multicam_ov")
    return {b: Detector.load(convert(knn_run, "intel-cpu", out / f"b{b}", precision="int8", calib_count=8,
                                     progress=False, batch=b)) for b in (1, 4)}


def test_batch4_openvino_bundle_equals_batch1_per_frame_across_cameras(ov_int8, videos):
    det1, det4 = ov_int8[1], ov_int8[4]
    assert det4.engine.batch == 4 and det1.engine.batch == 1
    assert det4.bundle.manifest.info["batch"]["size"] == 4
    assert det4.bundle.manifest.info["batch"]["max_map_diff"] <= 1e-4
    with det4.stream(videos, keep_frames=True, batch_wait_ms=50) as stream:
        results = list(stream)
    s = stream.stats
    assert s.delivered == 18 and all(_accounted(cs) for cs in s.sources.values())
    assert s.batch == 4 and s.batches < 18 and s.batch_fill > 0.25  # frames of several cameras shared calls
    for res in results:
        ref = det1.predict(res.frame)
        np.testing.assert_allclose(res.model_map, ref.model_map, atol=1e-4, rtol=0)
        assert abs(res.score - ref.score) <= 1e-4
    # batch-1 bundles keep working with several sources (one frame per call, round-robin)
    with det1.stream(videos) as stream1:
        assert len(list(stream1)) == 18
    assert stream1.stats.batch == 1 and stream1.stats.batch_fill == 1.0


def test_convert_batch_is_checked(knn_run, tmp_path):
    with pytest.raises(ValueError, match="batch must be an int"):
        convert(knn_run, "intel-cpu", tmp_path / "y", precision="fp32", calib_count=8, progress=False, batch=0)
    with pytest.raises(ValueError, match="batch must be an int"):
        convert(knn_run, "onnx-cpu", tmp_path / "z", precision="fp32", calib_count=8, progress=False, batch=True)


@pytest.fixture(scope="module")
def det4(knn_run, real_root, tmp_path_factory):
    """The ``det`` bundle (onnx-cpu FP32, same arguments) at static batch 4."""
    path = convert(knn_run, "onnx-cpu", tmp_path_factory.mktemp("multicam_b4") / "onnx", precision="fp32",
                   calib_count=8, val_data=real_root, progress=False, batch=4)
    return Detector.load(path)


def test_batch4_onnxruntime_bundle_equals_batch1_per_frame(det, det4, images, videos):
    assert det4.engine.name == "onnxruntime" and det4.engine.batch == 4 and det.engine.batch == 1
    m = det4.bundle.manifest
    assert m.input.batch == 4 and m.info["batch"]["size"] == 4 and m.info["batch"]["frames_compared"] == 8
    assert m.info["batch"]["max_map_diff"] <= 1e-4 and m.info["batch"]["max_score_diff"] <= 1e-4
    # calibration, fidelity and thresholds are those of the batch-1 conversion (they run at batch 1)
    assert m.calibration == det.bundle.manifest.calibration and m.fidelity == det.bundle.manifest.fidelity
    assert m.thresholds == det.bundle.manifest.thresholds
    frames = images[:7]  # one full call of 4 and a padded call of 3
    for res, ref in zip(det4.predict_batch(frames), [det.predict(f) for f in frames]):
        np.testing.assert_allclose(res.model_map, ref.model_map, atol=1e-4, rtol=0)
        assert abs(res.score - ref.score) <= 1e-4 and res.is_anomalous == ref.is_anomalous
    with det4.stream(videos, keep_frames=True, batch_wait_ms=50) as stream:
        results = list(stream)
    s = stream.stats
    assert s.delivered == 18 and all(_accounted(cs) for cs in s.sources.values())
    assert s.batch == 4 and s.batches < 18  # frames of several cameras shared calls
    for res in results:
        ref = det.predict(res.frame)
        np.testing.assert_allclose(res.model_map, ref.model_map, atol=1e-4, rtol=0)
        assert abs(res.score - ref.score) <= 1e-4


def test_batch4_tensorrt_qdq_onnx_is_static_and_equals_batch1(knn_run, images, tmp_path):
    import onnx

    from edge_ad.converters.convert import MAX_REBATCH_ERROR
    from edge_ad.converters.fidelity import onnxruntime_runner
    from edge_ad.methods import load_detector
    from edge_ad.runtime.bundle import load_bundle
    from edge_ad.runtime.preprocessing import preprocess_batch

    bundles = {b: load_bundle(convert(knn_run, "jetson-orin", tmp_path / f"b{b}", precision="int8", calib_count=8,
                                      progress=False, batch=b)) for b in (1, 4)}
    graphs = {b: onnx.load(str(bundles[b].path("model.onnx"))) for b in bundles}
    dims = [d.dim_value for d in graphs[4].graph.input[0].type.tensor_type.shape.dim]
    assert dims == [4, 3, 64, 64] and bundles[4].manifest.input.batch == 4
    ops = {b: sorted(n.op_type for n in g.graph.node) for b, g in graphs.items()}
    assert ops[4] == ops[1] and "QuantizeLinear" in ops[4]  # the same Q/DQ graph, only the batch differs
    quant = {b: {k: v for k, v in bundles[b].manifest.info["quantization"].items() if k != "onnx_path"} for b in bundles}
    assert quant[4] == quant[1]  # same calibration, same scales (the temporary file path differs)
    assert bundles[4].manifest.fidelity == bundles[1].manifest.fidelity  # fidelity runs at batch 1
    runners = {b: onnxruntime_runner(bundles[b].path("model.onnx")) for b in bundles}
    assert runners[4].batch_size == 4 and runners[1].batch_size == 1
    frames = preprocess_batch(images[:6], load_detector(knn_run).preprocess_spec, color_order="bgr")
    (m1, s1), (m4, s4) = runners[1](frames), runners[4](frames)  # real shots: one full batch, one padded
    assert np.abs(m4 - m1).max() <= MAX_REBATCH_ERROR and np.abs(s4 - s1).max() <= MAX_REBATCH_ERROR
    assert bundles[4].manifest.info["batch"]["max_map_diff"] <= MAX_REBATCH_ERROR


def test_multi_camera_example_on_four_videos(det, videos):
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "multi_camera.py"
    proc = subprocess.run([sys.executable, str(example), str(det.bundle.source), *videos.values()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = proc.stderr.strip().splitlines()
    rows = {line.split()[0]: line.split()[1:5] for line in table[1:]}
    assert rows["cam0"] == ["6", "6", "0", "0"] and rows["cam3"] == ["3", "3", "0", "0"]
    assert rows["total"][:2] == ["18", "18"]
