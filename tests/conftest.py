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



# The multi-process runs (`-m slow`), longest first, as measured on 2 cores (2026-12-02: 216 s down to 44 s).
# .ci/run runs them in their own xdist session, whose load scheduler hands each process the next test as it
# finishes one: in this order the session ends on the short runs instead of with one long run alone.
SLOW_LONGEST_FIRST = (
    "test_concurrent_sweep.py::test_concurrent_runs_stop_together_and_resume_as_a_sweep",
    "test_run_signals.py::test_sigint_sigterm_kill_cleanly_and_resume",
    "test_jobs_run.py::test_kill_worker_resume_nan",
    "test_jobs_cluster.py::test_submit_across_two_nodes_with_mlflow_server_outage",
    "test_jobs_run.py::test_zero_stages_agree_in_a_sweep",
    "test_finetune_run.py::test_finetune_from_an_imported_checkpoint",
    "test_curriculum.py::test_a_curriculum_run_trains_through_its_stages_and_logs_scaled_acc",
    "test_text_lm_run.py::test_text_lm_run_eval_compare",
    "test_run_signals.py::test_two_runs_at_once_into_one_store",
    "test_jobs_run.py::test_disk_full_keeps_previous_checkpoint",
    "test_validation.py::test_early_stop_run_ends_finished_with_tag_best_metrics_and_final_evals",
    "test_jobs_run.py::test_worker_exception_is_said_and_kept",
)


def pytest_collection_modifyitems(config, items):
    """Slow tests in SLOW_LONGEST_FIRST's order (unlisted slow tests after them), ahead of the rest, which keep
    their collection order. Deterministic, so every xdist process collects the same order."""
    def rank(item):
        if item.get_closest_marker("slow") is None:
            return len(SLOW_LONGEST_FIRST) + 1
        return next((i for i, name in enumerate(SLOW_LONGEST_FIRST) if item.nodeid.endswith(name)), len(SLOW_LONGEST_FIRST))

    items.sort(key=rank)
