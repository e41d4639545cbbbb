import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run the real `hybridlab` CLI in a subprocess; returns CompletedProcess."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "hybridlab.cli", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def run_under_interpreter(script: str, timeout: int = 900, **env) -> None:
    """Run ``script`` in a fresh Python with TRITON_INTERPRET=1 (set before triton is imported, so
    nothing else in the suite is affected); ``TESTS_DIR`` in it names this folder. Fails with its output."""
    script = script.replace("TESTS_DIR", repr(str(Path(__file__).parent)))
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", **env)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

