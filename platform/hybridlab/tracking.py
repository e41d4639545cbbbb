"""MLflow tracking that never stops training: an ordered, buffered, retrying logger.

Every write (params, tags, metrics, artifacts, run status) goes into one
ordered queue drained by a background thread. When the tracking server stops
answering, the thread keeps the pending writes, warns once per outage, retries
with backoff, and flushes everything when the server is back. ``close()``
waits for the flush; what still cannot be sent is saved to a JSON-lines file
whose path is printed, so nothing is lost.

The tracking URI: the job's ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///mlruns.db`` (a file in the current directory).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Optional

from .errors import UserError

DEFAULT_URI = "sqlite:///mlruns.db"
MAX_PARAM_LEN = 6000


def tracking_uri(job_uri: Optional[str] = None) -> str:
    return job_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text[:200]}"


_FILE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def client(uri: str, timeout_s: int = 10):
    """An ``MlflowClient`` for ``uri``; a URI MLflow cannot use becomes a one-line UserError."""
    # fail fast inside MLflow's REST client; callers report or retry themselves
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    from mlflow import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as e:
        u, hint = str(uri), ""
        if "://" not in u and (u.startswith(("/", ".", "~")) or u.endswith(_FILE_SUFFIXES)):
            hint = f" (did you mean sqlite:///{os.path.expanduser(u)}?)"
        raise UserError(f"cannot use MLflow tracking URI {uri!r}{hint}: {_short(e)}") from None


class Tracker:
    """A buffered MLflow client for one tracking URI."""

    def __init__(self, uri: str, retry_max_s: float = 10.0):
        # fail fast inside MLflow's REST client; this class does the retrying
        self.uri = uri
        self.client = client(uri, timeout_s=5)
        self.retry_max_s = retry_max_s
        self._ops: deque = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._outage_since: Optional[float] = None
        self.warnings = 0
        self._thread = threading.Thread(target=self._drain, name="hybridlab-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ synchronous (start of a run)

    def _sync(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise UserError(f"MLflow tracking at {self.uri} failed while {what}: {_short(e)}") from None

    def experiment_id(self, name: str) -> str:
        exp = self._sync("looking up the experiment", self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self._sync("restoring the experiment", self.client.restore_experiment, exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # a concurrent creator won the race
            exp = self._sync("creating the experiment", self.client.get_experiment_by_name, name)
            if exp is None:
                raise UserError(f"MLflow tracking at {self.uri}: cannot create experiment {name!r}") from None
            return exp.experiment_id

    def create_run(self, experiment: str, run_name: str, tags: dict, parent_run_id: Optional[str] = None) -> str:
        exp_id = self.experiment_id(experiment)
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self._sync("creating the run", self.client.create_run, exp_id, tags=tags, run_name=run_name)
        return run.info.run_id

    def get_run(self, run_id: str):
        try:
            return self.client.get_run(run_id)
        except Exception as e:
            text = str(e)
            if "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or "No run" in text:
                raise UserError(f"no MLflow run {run_id!r} in {self.uri}") from None
            raise UserError(f"MLflow tracking at {self.uri} failed while reading run {run_id}: {_short(e)}") from None

    def reopen(self, run_id: str) -> None:
        self._sync("reopening the run", self.client.update_run, run_id, status="RUNNING")

    # ------------------------------------------------------------ buffered

    def _put(self, op: tuple) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k)[:250], str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._put(("batch", run_id, [], items[i:i + 100], []))

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._put(("batch", run_id, [], [], [RunTag(str(k), str(v)) for k, v in tags.items()]))

    def log_metrics(self, run_id: str, metrics: dict, step: int, timestamp: Optional[float] = None) -> None:
        from mlflow.entities import Metric

        ts = int((timestamp or time.time()) * 1000)
        ms = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if isinstance(v, (int, float))]
        if ms:
            self._put(("metrics", run_id, ms))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._put(("text", run_id, text, artifact_file))

    def terminate(self, run_id: str, status: str = "FINISHED") -> None:
        self._put(("terminate", run_id, status))

    def pending(self) -> int:
        with self._cv:
            return len(self._ops)

    # ------------------------------------------------------------ the drain thread

    def _send(self, op: tuple) -> None:
        kind, run_id = op[0], op[1]
        if kind == "metrics":
            self.client.log_batch(run_id, metrics=op[2], synchronous=True)
        elif kind == "batch":
            self.client.log_batch(run_id, metrics=op[2], params=op[3], tags=op[4], synchronous=True)
        elif kind == "text":
            self.client.log_text(run_id, op[2], op[3])
        elif kind == "terminate":
            self.client.set_terminated(run_id, status=op[2])

    def _next(self) -> Optional[tuple]:
        """The head op, with consecutive metric ops of the same run merged (≤ 1000 metrics)."""
        with self._cv:
            while not self._ops and not self._closing:
                self._cv.wait(0.5)
            if not self._ops:
                return None
            head = self._ops[0]
            if head[0] != "metrics":
                return head
            merged, n = list(head[2]), 1
            while n < len(self._ops) and self._ops[n][0] == "metrics" and self._ops[n][1] == head[1] \
                    and len(merged) + len(self._ops[n][2]) <= 1000:
                merged.extend(self._ops[n][2])
                n += 1
            return ("metrics", head[1], merged, n)

    def _pop(self, op: tuple) -> None:
        with self._cv:
            for _ in range(op[3] if op[0] == "metrics" else 1):
                self._ops.popleft()
            self._cv.notify_all()

    def _drain(self) -> None:
        delay = 0.5
        while True:
            op = self._next()
            if op is None:
                return
            try:
                self._send(op)
            except Exception as e:
                if self._outage_since is None:
                    self._outage_since = time.time()
                    self.warnings += 1
                    _warn(f"MLflow at {self.uri} is unreachable ({_short(e)}); training goes on, "
                          f"metrics are buffered and retried")
                with self._cv:
                    if self._closing and self._give_up:
                        return
                    self._cv.wait(delay)
                delay = min(self.retry_max_s, delay * 2)
                continue
            if self._outage_since is not None:
                _warn(f"MLflow at {self.uri} is back after {time.time() - self._outage_since:.0f}s; "
                      f"flushing {self.pending()} buffered writes")
                self._outage_since = None
            delay = 0.5
            self._pop(op)

    _give_up = False

    def close(self, timeout: Optional[float] = None, spill_dir: Optional[str] = None) -> Optional[str]:
        """Flush everything (waiting up to ``timeout`` s, default $HYBRIDLAB_MLFLOW_FLUSH_TIMEOUT or 120);
        spill what is left to a file."""
        if timeout is None:
            timeout = float(os.environ.get("HYBRIDLAB_MLFLOW_FLUSH_TIMEOUT", "120"))
        deadline = time.time() + timeout
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            while self._ops and time.time() < deadline:
                self._cv.wait(min(1.0, max(0.0, deadline - time.time())))
            self._give_up = True
            self._cv.notify_all()
            left = list(self._ops)
        self._thread.join(timeout=10)
        if not left:
            return None
        path = Path(spill_dir or ".") / f"mlflow_unsent_{int(time.time())}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for op in left:
                f.write(json.dumps(_op_json(op)) + "\n")
        _warn(f"MLflow at {self.uri} stayed unreachable: {len(left)} writes saved to {path}")
        return str(path)


def _op_json(op: tuple) -> dict:
    kind, run_id = op[0], op[1]
    if kind == "metrics":
        return {"kind": kind, "run_id": run_id, "metrics": [[m.key, m.value, m.timestamp, m.step] for m in op[2]]}
    if kind == "batch":
        return {"kind": kind, "run_id": run_id, "params": {p.key: p.value for p in op[3]}, "tags": {t.key: t.value for t in op[4]}}
    if kind == "text":
        return {"kind": kind, "run_id": run_id, "artifact_file": op[3], "text": op[2]}
    return {"kind": kind, "run_id": run_id, "status": op[2]}


def check_reachable(uri: str) -> None:
    """Raise UserError when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            r.read()
    except Exception as e:
        raise UserError(f"MLflow tracking server at {uri} is not reachable ({_short(e)})") from None


def git_sha(start: Optional[str] = None) -> str:
    import subprocess

    here = start or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except Exception:
        pass
    return "unknown"

