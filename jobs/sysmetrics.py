"""MLflow system metrics (CPU, memory, disk, network; GPU utilisation and memory through pynvml) for a run.

One monitor per node: the worker with local rank 0 of each node starts mlflow's
``SystemMetricsMonitor`` with ``node_id = node_<node rank>``, so a multi-node run's metrics read
``system/node_0/cpu_utilization_percentage``, ``system/node_1/gpu_0_utilization_percentage``, ...
GPU metrics need ``nvidia-ml-py`` (in the ``train`` extra); without a GPU they are simply absent.
The job's ``tracking.system_metrics: false`` turns it off, ``tracking.system_metrics_interval``
sets the sampling interval (seconds). mlflow is imported here only, lazily (``jobs`` never needs it
otherwise).
"""

from __future__ import annotations

import os
from typing import Optional


def absolute_uri(uri: str) -> str:
    """A tracking URI that means the same from any working directory (``sqlite:///rel.db`` made absolute)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    if "://" not in uri and uri and not uri.startswith("databricks"):
        return os.path.abspath(uri)
    return uri


def node_id(node_rank: int) -> str:
    return f"node_{int(node_rank)}"


def start_system_metrics(run: dict, tracking: dict, local_rank: int, node_rank: int):
    """The started monitor on the node's first worker, else None (never raises: metrics are optional)."""
    run_id, uri = run.get("mlflow_run_id"), run.get("tracking_uri")
    if not run_id or not uri or local_rank != 0 or not (tracking or {}).get("system_metrics", True):
        return None
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        interval = float((tracking or {}).get("system_metrics_interval", 10.0))
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                       resume_logging=True, node_id=node_id(node_rank), tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # pragma: no cover - an unreachable store must not stop training
        print(f"[hybridlab] warning: system metrics not recorded ({type(e).__name__}: {str(e)[:200]})", flush=True)
        return None


def stop_system_metrics(monitor: Optional[object]) -> None:
    if monitor is not None:
        try:
            monitor.finish()
        except Exception:  # pragma: no cover
            pass
