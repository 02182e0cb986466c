"""Environment report behind ``edge-ad info``: versions, engines, the C++ extension, CPU features.

Torch-free on purpose (a Jetson image often has no torch): package versions are read from
installed metadata, never by importing the package.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
import platform
from pathlib import Path
from typing import Any

from ._version import __version__

# distribution name -> what the report calls it
_PACKAGES = {
    "torch": "torch",
    "timm": "timm",
    "peft": "peft",
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnxruntime-gpu": "onnxruntime-gpu",
    "openvino": "openvino",
    "nncf": "nncf",
    "tensorrt": "tensorrt",
    "pycuda": "pycuda",
    "numpy": "numpy",
}

# CPU flags that matter for inference speed (x86 /proc/cpuinfo "flags", aarch64 "Features").
_INTERESTING_CPU_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "fphp", "asimdhp", "asimddp", "sve", "i8mm", "bf16",
)


def _dist_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _tensorrt_version() -> str | None:
    # JetPack installs TensorRT's Python bindings as a Debian package without pip metadata.
    version = _dist_version("tensorrt")
    if version is None:
        try:
            version = getattr(importlib.import_module("tensorrt"), "__version__", "unknown")
        except Exception:
            return None
    return version


def cpu_features() -> list[str]:
    """The performance-relevant CPU flags of this machine (Linux; empty elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return []
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in _INTERESTING_CPU_FLAGS if f in flags]


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("model name", "Model")):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown"


def _opencv_report() -> dict[str, Any]:
    from edge_ad.runtime import _cv

    if not _cv.cv2_available():
        return {"available": False, "error": _cv._CV2_ERROR}
    cv2 = _cv.require_cv2("report its build")
    build = cv2.getBuildInformation()
    gstreamer = any("GStreamer" in line and "YES" in line for line in build.splitlines())
    return {"available": True, "version": cv2.__version__, "gstreamer": gstreamer, "path": cv2.__file__}


def _extension_report() -> dict[str, Any]:
    try:
        from edge_ad.runtime import preprocessing as _pre

        built = bool(_pre.extension_available())
    except Exception as exc:  # the module itself failing to import is worth reporting, not crashing
        return {"built": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"built": built}


def collect_info() -> dict[str, Any]:
    """Everything ``edge-ad info`` prints, as a dict (JSON-serialisable)."""
    packages = {name: _dist_version(dist) for dist, name in _PACKAGES.items() if dist != "tensorrt"}
    packages["tensorrt"] = _tensorrt_version()
    return {
        "edge_ad": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_features": cpu_features(),
        "packages": packages,
        "opencv": _opencv_report(),
        "preprocess_extension": _extension_report(),
    }


def info() -> dict[str, Any]:
    """Print the environment report and return it (the function behind ``edge-ad info``)."""
    report = collect_info()
    print(format_info(report))
    return report


def format_info(report: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`collect_info`."""
    lines = [
        f"edge_ad        {report['edge_ad']}",
        f"python         {report['python']} ({report['platform']})",
        f"cpu            {report['cpu']} [{report['machine']}]",
        f"cpu features   {' '.join(report['cpu_features']) or '-'}",
    ]
    ext = report["preprocess_extension"]
    lines.append("C++ preprocess " + ("built" if ext["built"] else f"NOT built ({ext.get('error', 'using numpy reference path')})"))
    cv = report["opencv"]
    if cv["available"]:
        lines.append(f"opencv         {cv['version']} (GStreamer: {'yes' if cv['gstreamer'] else 'no'})")
    else:
        lines.append("opencv         not installed: pip install edge-ad[opencv] (or use JetPack's python3-opencv)")
    for name, version in report["packages"].items():
        lines.append(f"{name:<14} {version or '-'}")
    return "\n".join(lines)
