"""Run Python code in a child interpreter where torch (and torch-only libraries) cannot be imported,
exactly as on a Jetson image without torch. Shared by the tests that guard torch-free modules."""
from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("torch", "torchvision", "timm", "peft")

# Installed before anything else in the child: any attempt to import a blocked package fails loudly.
BLOCK_TORCH = textwrap.dedent(
    f"""
    import sys, importlib.abc

    class _BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    """
)


def run_without_torch(code: str, *, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) after the blocker; returns the completed process (text mode)."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)
