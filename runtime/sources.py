"""Frame sources for streaming: one :func:`open_source` factory and a small class per kind.

A source delivers uint8 frames, one :meth:`FrameSource.read` at a time:

* a frame (numpy array as the device delivers it; OpenCV sources give BGR (H, W, 3));
* a :class:`Skip` for an item that exists but cannot be used (a corrupt image file, a None from
  an iterable): the stream counts and reports it and goes on;
* ``None`` when the source has ended (end of file / folder / iterable);
* or it raises :class:`SourceError` when the source is lost (camera unplugged, network down,
  folder deleted): the stream may then :meth:`~FrameSource.close` and :meth:`~FrameSource.open`
  it again (reconnect with back-off) when :attr:`~FrameSource.reopenable`.

``live`` sources (cameras, RTSP, GStreamer) produce frames in real time whether or not they are
read, so a stream defaults to line-speed mode (drop stale frames) for them; files, folders and
iterables wait for the reader, so the stream defaults to lossless mode.

Torch-free; OpenCV is needed for cameras, video files, RTSP, GStreamer and image folders.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._cv import require_cv2
from .image_io import is_image_file, read_image, read_image_reduced

__all__ = [
    "VIDEO_SUFFIXES",
    "CameraSource",
    "FolderSource",
    "FrameSource",
    "GStreamerSource",
    "IterableSource",
    "NetworkStreamSource",
    "Skip",
    "SourceError",
    "VideoFileSource",
    "gstreamer_available",
    "open_source",
]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpeg", ".mjpg", ".h264", ".h265", ".ts")
_URL = re.compile(r"^(rtsp|rtsps|rtmp|http|https|udp|tcp)://", re.IGNORECASE)


class SourceError(RuntimeError):
    """The source cannot be opened or was lost while reading (the stream may reconnect)."""


@dataclass(frozen=True)
class Skip:
    """An item the source could not turn into a frame; the stream reports it and continues.

    Attributes:
        reason: short machine-readable reason (e.g. ``"unreadable_file"``).
        detail: what was skipped and why, for people (e.g. the file path and decoder error).
    """

    reason: str
    detail: str


class FrameSource:
    """Base class of the sources; subclass it for a custom device (override open / read / close).

    Attributes:
        name: how results and stats name the source (``Result.source``).
        live: frames arrive in real time whether read or not (cameras, network streams).
        reopenable: :meth:`open` may be called again after a :class:`SourceError` (reconnect).
        fps: nominal frame rate reported by the device / container, or None when unknown.
        end_message: set by :meth:`read` when the source ended abnormally (e.g. a truncated
            video); the stream reports it as an event.
    """

    name: str = "source"
    live: bool = False
    reopenable: bool = False
    fps: float | None = None
    #: The last frame was decoded at 1/last_scale of its stored size per axis (see FolderSource).
    last_scale: int = 1
    #: (height, width) of the last frame as stored (its full size) when it was decoded smaller
    #: (``last_scale`` > 1); results are given in these pixels. None: the frame is full size.
    last_size: tuple[int, int] | None = None

    def __init__(self) -> None:
        self.end_message: str | None = None

    def open(self) -> None:
        """Open (or re-open after a loss) the source; raises :class:`SourceError` on failure."""

    def read(self) -> np.ndarray | Skip | None:
        """Next frame, a :class:`Skip`, or None at the end; raises :class:`SourceError` when lost."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the device / file; safe to call twice."""

    def reduce_decode(self, min_size: tuple[int, int]) -> bool:
        """Decode frames at reduced size, keeping at least ``min_size`` (height, width) pixels, where
        the source can (image folders); returns whether it will. The base class cannot: False."""
        return False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ------------------------------------------------------------------------------------------------
# OpenCV VideoCapture sources
# ------------------------------------------------------------------------------------------------


def gstreamer_available() -> bool:
    """True when the importable OpenCV was built with GStreamer (needed for pipeline sources)."""
    cv2 = require_cv2("open GStreamer pipelines")
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line.split(":", 1)[1]
    return False


class _CaptureSource(FrameSource):
    """Shared VideoCapture plumbing: open with an API preference, read, release."""

    _api_name = "CAP_ANY"

    def __init__(self, target: int | str, name: str) -> None:
        super().__init__()
        self.target = target
        self.name = name
        self._cap: Any = None

    def _fix_hint(self) -> str:
        return "check the device / path"

    def open(self) -> None:
        cv2 = require_cv2(f"read frames from {self.name}")
        self.close()
        cap = cv2.VideoCapture(self.target, getattr(cv2, self._api_name, cv2.CAP_ANY))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {self.name} with OpenCV ({self._api_name}): {self._fix_hint()}")
        self._cap = cap
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0.0 < fps < 1000.0 else None

    def _grab(self) -> np.ndarray | None:
        if self._cap is None:
            raise SourceError(f"{self.name} is not open")
        ok, frame = self._cap.read()
        return frame if ok and frame is not None else None

    def read(self) -> np.ndarray | Skip | None:
        frame = self._grab()
        if frame is None:
            raise SourceError(f"reading a frame from {self.name} failed (device disconnected or stream interrupted)")
        return frame

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


class CameraSource(_CaptureSource):
    """A local camera: an index (``0``) or a V4L2 device path (``/dev/video0``)."""

    live = True
    reopenable = True

    def __init__(self, device: int | str) -> None:
        is_path = isinstance(device, str)
        super().__init__(device, f"camera:{device}")
        self._api_name = "CAP_V4L2" if is_path else "CAP_ANY"

    def _fix_hint(self) -> str:
        return ("is the camera connected, not used by another process, and readable by this user "
                "(`v4l2-ctl --list-devices`; on Linux add the user to the 'video' group)?")


class NetworkStreamSource(_CaptureSource):
    """An RTSP / HTTP / UDP stream URL, decoded by OpenCV's FFmpeg backend."""

    live = True
    reopenable = True
    _api_name = "CAP_FFMPEG"

    def __init__(self, url: str) -> None:
        super().__init__(url, url)

    def _fix_hint(self) -> str:
        return "check the URL, credentials and network, e.g. with `ffprobe <url>`"


class GStreamerSource(_CaptureSource):
    """A GStreamer pipeline string ending in ``appsink``, through OpenCV's GStreamer backend."""

    live = True
    reopenable = True
    _api_name = "CAP_GSTREAMER"

    def __init__(self, pipeline: str) -> None:
        if not pipeline.rstrip().split("!")[-1].strip().startswith("appsink"):
            raise ValueError(f"a GStreamer source must be a pipeline ending in 'appsink ...', got {pipeline!r}")
        super().__init__(pipeline, "gstreamer:" + pipeline.split("!")[0].strip())

    def open(self) -> None:
        if not gstreamer_available():
            raise SourceError(
                "this OpenCV build has no GStreamer support (cv2.getBuildInformation() shows 'GStreamer: NO'), so "
                "pipeline sources cannot be opened. On Jetson use JetPack's system OpenCV (apt install python3-opencv; "
                "uninstall pip opencv-python wheels, which shadow it); elsewhere build OpenCV with "
                "-DWITH_GSTREAMER=ON. "
                "Alternatively pass a camera index, device path or URL."
            )
        super().open()

    def _fix_hint(self) -> str:
        return "test the pipeline with `gst-launch-1.0 <pipeline with fakesink>`; it must end in appsink"


class VideoFileSource(_CaptureSource):
    """A video file; ends at the end of the file (reporting a file that ends before its header says)."""

    live = False
    reopenable = False

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(str(path), str(path))
        self._read = 0
        self._expected: int | None = None

    def _fix_hint(self) -> str:
        return "is it a video this OpenCV's FFmpeg can decode (`ffprobe <file>`)?"

    def open(self) -> None:
        super().open()
        cv2 = require_cv2("read video files")
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._expected = count if count > 0 else None
        self._read = 0

    def read(self) -> np.ndarray | Skip | None:
        frame = self._grab()
        if frame is None:
            if self._expected is not None and self._read < self._expected:
                self.end_message = (f"{self.name} ended after {self._read} of the {self._expected} frames its header "
                                    "announces (truncated or corrupt file)")
            return None
        self._read += 1
        return frame


# ------------------------------------------------------------------------------------------------
# Folders and iterables
# ------------------------------------------------------------------------------------------------


class FolderSource(FrameSource):
    """The image files of a folder in sorted name order, read as BGR; unreadable files are skipped.

    Reduced-size decode (``min_size`` set): each JPEG is decoded at 1/2, 1/4 or 1/8 of its size
    (OpenCV ``IMREAD_REDUCED_COLOR_*``: libjpeg's DCT scaling; other formats in full) when that still gives at least
    ``min_size`` pixels on both axes (:func:`~edge_ad.runtime.image_io.read_image_reduced`: the
    factor comes from each file's header), so a 224 px model does not pay for decoding a 0.5 MP
    JPEG in full. :attr:`last_scale` is the factor of the frame :meth:`read` returned last and
    :attr:`last_size` its full (H, W), in which a stream reports the frame's results.
    """

    live = False
    reopenable = True  # a folder on a network share that vanishes briefly can come back

    def __init__(self, path: str | os.PathLike, min_size: tuple[int, int] | None = None) -> None:
        """``min_size``: (height, width) pixels the decoded frames must keep (the model input);
        None decodes every file at full size."""
        super().__init__()
        self.path = Path(path)
        self.name = str(self.path)
        self.min_size = None if min_size is None else (int(min_size[0]), int(min_size[1]))
        self.last_scale = 1
        self.last_size: tuple[int, int] | None = None
        self._files: list[Path] | None = None
        self._pos = 0

    def open(self) -> None:
        if not self.path.is_dir():
            raise SourceError(f"image folder {self.path} does not exist (or is not a folder)")
        if self._files is None:  # re-opening after a loss keeps the position and the listing
            self._files = sorted(p for p in self.path.iterdir() if is_image_file(p))
            self._pos = 0
            if not self._files:
                raise SourceError(f"image folder {self.path} has no image files ({', '.join(sorted(_suffixes()))})")

    def read(self) -> np.ndarray | Skip | None:
        if self._files is None:
            raise SourceError(f"{self.name} is not open")
        if self._pos >= len(self._files):
            return None
        if not self.path.is_dir():
            raise SourceError(f"image folder {self.path} disappeared while streaming")
        path = self._files[self._pos]
        self._pos += 1
        try:
            return self._decode(path)
        except (OSError, ValueError) as exc:
            return Skip("unreadable_file", f"{path}: {exc}")

    def reduce_decode(self, min_size: tuple[int, int]) -> bool:
        self.min_size = (int(min_size[0]), int(min_size[1]))
        return True

    def _decode(self, path: Path) -> np.ndarray:
        """One file as BGR, reduced when :attr:`min_size` allows; sets :attr:`last_scale` / :attr:`last_size`."""
        self.last_scale, self.last_size = 1, None
        if self.min_size is None:
            return read_image(path, "bgr")
        frame, factor, full = read_image_reduced(path, self.min_size, "bgr")
        if factor > 1:
            self.last_scale, self.last_size = factor, full
        return frame


def _suffixes() -> set[str]:
    from .image_io import IMAGE_SUFFIXES

    return set(IMAGE_SUFFIXES)


class IterableSource(FrameSource):
    """Any iterable / iterator of frames (numpy arrays); items are validated by the stream.

    The stream keeps a reference to each frame until its result is made: do not modify a frame
    after yielding it (yield a new array or a copy each time).
    """

    live = False
    reopenable = False  # an iterator cannot be restarted

    def __init__(self, frames: Iterable[Any], name: str | None = None) -> None:
        super().__init__()
        self._iterable = frames
        self._it: Iterator[Any] | None = None
        self.name = name or f"iterable:{type(frames).__name__}"

    def open(self) -> None:
        if self._it is None:
            self._it = iter(self._iterable)

    def read(self) -> Any:
        if self._it is None:
            raise SourceError(f"{self.name} is not open")
        try:
            item = next(self._it)
        except StopIteration:
            return None
        except Exception as exc:
            raise SourceError(f"{self.name} raised {type(exc).__name__}: {exc}") from exc
        # None means "ended" to the stream: a None item (a grabber's missed frame) is a skip instead.
        return Skip("none_item", "the iterable yielded None instead of a frame") if item is None else item


# ------------------------------------------------------------------------------------------------
# Factory
# ------------------------------------------------------------------------------------------------


def open_source(spec: Any) -> FrameSource:
    """Turn a source description into a :class:`FrameSource` (not opened yet).

    Args:
        spec: one of

            * an int or digit string (``0``, ``"1"``): camera index;
            * ``"/dev/videoN"``: V4L2 camera device;
            * ``"rtsp://..."`` (also rtsps, rtmp, http(s), udp, tcp URLs): network stream;
            * a string containing ``"!"`` and ending in an ``appsink`` element: GStreamer pipeline;
            * a folder path: its image files, sorted;
            * a video file path (``.mp4``, ``.avi``, ...; any other existing non-image file is
              tried as a video);
            * a :class:`FrameSource`: returned as is;
            * a (N, H, W, C) uint8 array, or any other iterable / iterator of frames.

    Raises:
        FileNotFoundError: a path that does not exist.
        TypeError: something that is none of the above.
    """
    if isinstance(spec, FrameSource):
        return spec
    if isinstance(spec, (bool, np.bool_)):
        raise TypeError(f"source must be a camera index, path, URL, pipeline or iterable of frames, got {spec!r}")
    if isinstance(spec, (int, np.integer)):
        return CameraSource(int(spec))
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("source is an empty string: pass a camera index, file, folder, URL or pipeline")
        if text.isdigit():
            return CameraSource(int(text))
        if _URL.match(text):
            return NetworkStreamSource(text)
        if "!" in text:
            return GStreamerSource(text)
        if text.startswith("/dev/video"):
            return CameraSource(text)
        path = Path(text)
        if path.is_dir():
            return FolderSource(path)
        if path.is_file():
            if is_image_file(path):
                raise ValueError(f"source {path} is a single image; pass its folder, or use Detector.predict for one "
                                 "image")
            return VideoFileSource(path)
        raise FileNotFoundError(f"source {text!r} is not an existing file or folder, a camera index, a /dev/video* "
                                "device, a stream URL or a GStreamer pipeline ('... ! appsink')")
    if isinstance(spec, bytes):
        raise TypeError("source must be a str path / URL, not bytes")
    if isinstance(spec, np.ndarray):
        if spec.ndim != 4:
            raise TypeError(f"an array source must be a (N, H, W, C) stack of frames, got shape {spec.shape}; pass a "
                            "list of frames (e.g. [frame] for one frame, list(grey_stack) for (N, H, W) grey frames)")
        return IterableSource(list(spec), name=f"array{tuple(spec.shape)}")
    if isinstance(spec, Iterable):
        return IterableSource(spec)
    raise TypeError(f"source must be a camera index, path, URL, pipeline, FrameSource or iterable of frames, got "
                    f"{type(spec).__name__}")
