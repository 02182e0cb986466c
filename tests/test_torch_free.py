"""The runtime and the device-side CLI verbs must work on a machine without torch (Jetson images)."""
from __future__ import annotations

import subprocess
import sys

from torch_blocker import run_without_torch

def test_blocker_really_blocks_torch():
    # Guards the guard: if the blocker silently stopped working, the tests below would prove nothing.
    proc = run_without_torch("import torch")
    assert proc.returncode != 0
    assert "blocked for this test: torch" in proc.stderr


def test_runtime_imports_without_torch():
    proc = run_without_torch(
        """
        import numpy as np
        import edge_ad
        import edge_ad.runtime as rt
        from edge_ad.runtime.preprocessing import preprocess, extension_available
        # every runtime module and the device-side CLI verbs (argument parsing included)
        import edge_ad.runtime.stream, edge_ad.runtime.sources, edge_ad.runtime.benchmark
        import edge_ad.runtime.calibrate, edge_ad.runtime.overlay, edge_ad.runtime.cuda
        import edge_ad.runtime.engines.tensorrt_engine
        import edge_ad.cli.run, edge_ad.cli.benchmark, edge_ad.cli.calibrate, edge_ad.cli.build_engine
        spec = rt.PreprocessSpec(32, 48)
        out = preprocess(np.zeros((60, 80, 3), np.uint8), spec)
        assert out.shape == (1, 3, 32, 48), out.shape
        assert "torch" not in sys.modules
        print("ok", extension_available())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_device_cli_verbs_run_without_torch():
    proc = run_without_torch(
        """
        from edge_ad.cli.main import main
        assert main(["info"]) == 0
        for verb in ("run", "benchmark", "calibrate", "build-engine", "targets"):
            try:
                main([verb, "--help"])
            except SystemExit as exc:
                assert exc.code == 0, verb
        try:
            main(["--help"])
        except SystemExit as exc:
            assert exc.code == 0
        assert "torch" not in sys.modules
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "C++ preprocess" in proc.stdout
    assert "edge-ad" in proc.stdout


def test_cli_entry_point_version():
    proc = subprocess.run([sys.executable, "-m", "edge_ad", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    import edge_ad

    assert proc.stdout.strip() == f"edge-ad {edge_ad.__version__}"
