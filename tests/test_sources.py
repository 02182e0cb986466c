"""Frame sources (edge_ad.runtime.sources) on real files: folders with corrupt files, video files
(whole and truncated), a camera whose reads fail, the GStreamer check, and the open_source factory."""
from __future__ import annotations

import shutil
import threading

import cv2
import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.runtime import Detector, read_image
from edge_ad.runtime import sources as src_mod
from edge_ad.runtime.sources import (
    CameraSource,
    FolderSource,
    GStreamerSource,
    IterableSource,
    NetworkStreamSource,
    SourceError,
    VideoFileSource,
    open_source,
)
from edge_ad.runtime.stream import ReconnectPolicy, StreamError

CATEGORY = "mvtec_hazelnut_256"
FAST = ReconnectPolicy(initial_delay=0.01, factor=2.0, max_delay=0.05, max_attempts=3)


@pytest.fixture(scope="module")
def det(knn_run, tmp_path_factory):
    path = convert(knn_run, "onnx-cpu", tmp_path_factory.mktemp("src_b") / "onnx", precision="fp32", calib_count=8,
                   progress=False)
    return Detector.load(path, regions=False)


@pytest.fixture(scope="module")
def good_paths(real_root):
    return sorted((real_root / CATEGORY / "train" / "good").glob("*.png"))[:12]


def _video(path, frames, fourcc="MJPG", fps=10.0):
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert writer.isOpened(), "this OpenCV cannot write MJPG .avi"
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def test_open_source_dispatch(tmp_path, good_paths):
    assert isinstance(open_source(0), CameraSource) and isinstance(open_source("2"), CameraSource)
    cam = open_source("/dev/video7")
    assert isinstance(cam, CameraSource) and cam.live and cam._api_name == "CAP_V4L2"
    assert isinstance(open_source("rtsp://10.0.0.5:554/stream1"), NetworkStreamSource)
    pipe = "videotestsrc ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1"
    assert isinstance(open_source(pipe), GStreamerSource)
    assert isinstance(open_source(tmp_path), FolderSource) and not open_source(tmp_path).live
    assert isinstance(open_source([np.zeros((4, 4, 3), np.uint8)]), IterableSource)
    assert isinstance(open_source(np.zeros((2, 4, 4, 3), np.uint8)), IterableSource)
    video = tmp_path / "v.avi"
    video.write_bytes(b"x")
    assert isinstance(open_source(video), VideoFileSource)
    with pytest.raises(ValueError, match="appsink"):
        open_source("videotestsrc ! fakesink")
    with pytest.raises(FileNotFoundError, match="not an existing file"):
        open_source(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="single image"):
        open_source(good_paths[0])
    with pytest.raises(TypeError, match="stack of frames"):
        open_source(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(TypeError):
        open_source(True)
    with pytest.raises(TypeError):
        open_source(3.5)


def test_gstreamer_needs_an_opencv_built_with_it(monkeypatch):
    pipe = "videotestsrc num-buffers=3 ! videoconvert ! video/x-raw,format=BGR ! appsink"
    monkeypatch.setattr(src_mod.require_cv2("test"), "getBuildInformation",
                        lambda: "  Video I/O:\n    GStreamer:   NO\n")
    assert not src_mod.gstreamer_available()
    with pytest.raises(SourceError, match="no GStreamer support.*JetPack"):
        GStreamerSource(pipe).open()
    monkeypatch.setattr(src_mod.require_cv2("test"), "getBuildInformation",
                        lambda: "    GStreamer:                   YES (1.20.3)\n")
    assert src_mod.gstreamer_available()


def test_folder_source_skips_corrupt_files(det, tmp_path, good_paths):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(good_paths[:4]):
        shutil.copy(p, folder / f"{i:03d}_{p.name}")
    (folder / "001a_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "002a_empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    stream = det.stream(folder)
    results = list(stream)
    s = stream.stats
    assert s.mode == "lossless" and s.captured == 6 and s.delivered == 4 and s.skipped == {"unreadable_file": 2}
    assert [k["frame_index"] for k in s.skips] == [2, 4]  # sorted order: 000, 001, 001a, 002, 002a, 003
    assert "001a_corrupt.png" in s.skips[0]["detail"] and "corrupt" in s.skips[0]["detail"]
    ordered = sorted(p for p in folder.iterdir() if p.suffix == ".png" and "corrupt" not in p.name)
    for res, path in zip(results, ordered):
        ref = det.predict(read_image(path, "bgr"))
        np.testing.assert_array_equal(res.raw_map, ref.raw_map)
        assert res.source == str(folder)


def test_folder_deleted_mid_stream(det, tmp_path, good_paths):
    folder = tmp_path / "vanishing"
    folder.mkdir()
    # Three times the images: far more than every bounded queue and in-flight slot together can
    # hold, so capture is still reading when the folder goes (12 files raced on a fast machine).
    files = good_paths * 3
    for i, p in enumerate(files):
        shutil.copy(p, folder / f"{i:03d}.png")
    baseline = set(threading.enumerate())
    stream = det.stream(folder, queue_size=1, reconnect=FAST)
    got = 0
    with pytest.raises(StreamError, match="gave up.*does not exist"):
        for _ in stream:
            got += 1
            if got == 1:
                shutil.rmtree(folder)
    assert 1 <= got < len(files)
    kinds = [e.kind for e in stream.events]
    assert kinds.count("source_lost") == 1 and kinds.count("reconnect_failed") == 3 and "gave_up" in kinds
    assert "disappeared" in next(e.message for e in stream.events if e.kind == "source_lost")
    assert not [t for t in threading.enumerate() if t not in baseline]


def test_video_file_whole_and_truncated(det, tmp_path, good_paths):
    frames = [read_image(p, "bgr") for p in good_paths[:10]]
    video = _video(tmp_path / "line.avi", frames)
    decoded = []
    cap = cv2.VideoCapture(str(video))
    while True:
        ok, f = cap.read()
        if not ok:
            break
        decoded.append(f)
    cap.release()
    assert len(decoded) == 10
    stream = det.stream(video)
    results = list(stream)
    assert len(results) == 10 and stream.mode == "lossless" and stream.source.fps == pytest.approx(10.0)
    for res, f in zip(results, decoded):
        np.testing.assert_array_equal(res.raw_map, det.predict(f).raw_map)
    assert not any(e.message.startswith(str(video)) for e in stream.events if e.kind == "source_ended")
    # Cut the file in the middle of its frames: the header still announces 10.
    data = video.read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(data[: len(data) // 2])
    stream = det.stream(cut)
    results = list(stream)
    assert 0 < len(results) < 10
    ended = [e.message for e in stream.events if e.kind == "source_ended"]
    assert ended and "truncated" in ended[0] and f"after {len(results)} of the 10 frames" in ended[0]


class _FakeCapture:
    """Stands in for cv2.VideoCapture of a USB camera that gets unplugged after 3 frames."""

    unplugged = False

    def __init__(self, target, api):
        self.target, self.api, self.reads = target, api, 0

    def isOpened(self):
        return not _FakeCapture.unplugged

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        self.reads += 1
        if self.reads > 3:
            _FakeCapture.unplugged = True
            return False, None
        return True, np.full((48, 64, 3), 40 * self.reads, np.uint8)

    def release(self):
        pass


def test_camera_read_failure_reconnects_then_gives_up(det, monkeypatch):
    monkeypatch.setattr(src_mod.require_cv2("test"), "VideoCapture", _FakeCapture)
    _FakeCapture.unplugged = False
    stream = det.stream("/dev/video3", reconnect=FAST, lossless=True)
    assert stream.source.live and stream.mode == "lossless"
    got = []
    with pytest.raises(StreamError, match="gave up on source camera:/dev/video3 after 3") as info:
        for res in stream:
            got.append(res.frame_index)
    assert got == [0, 1, 2]
    assert "cannot open camera:/dev/video3" in str(info.value) and "video' group" in str(info.value)
    lost = next(e.message for e in stream.events if e.kind == "source_lost")
    assert "disconnected" in lost
    with pytest.raises(SourceError, match="cannot open"):
        iter(det.stream(5))  # the first open fails at once, in the caller
