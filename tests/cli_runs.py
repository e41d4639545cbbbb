"""Driving the real `hybridlab` CLI in a subprocess and acting on its output (signals mid-run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

HYBRIDLAB = [sys.executable, "-m", "hybridlab"]


def run_until(args, tmp_path, env: dict, trigger, action, timeout=600):
    """Start `hybridlab ARGS` in its own session; call ``action(proc)`` once ``trigger(lines so far)`` is true;
    return (exit code, stdout+stderr). The session is killed if the command outlives the test."""
    proc = subprocess.Popen(HYBRIDLAB + args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, done = [], False
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if not done and trigger(lines):
                action(proc)
                done = True
            assert time.time() < deadline, "".join(lines)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert done, out
    return proc.returncode, out


def ctrl_c(proc) -> None:
    """What a terminal's Ctrl-C does: SIGINT to the whole process group."""
    os.killpg(proc.pid, signal.SIGINT)
