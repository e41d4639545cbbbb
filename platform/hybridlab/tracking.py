"""MLflow tracking that never stops training: an ordered, buffered, retrying logger.

Every write (params, tags, metrics, artifacts, run status) is an op — a dataclass
with named fields (:class:`LogMetrics`, :class:`LogBatch`, :class:`LogText`,
:class:`Terminate`) — in one ordered queue drained by a background thread. When
the tracking server stops answering, the thread keeps the pending ops, warns once
per outage, retries with backoff, and flushes everything when the server is back.
``close()`` waits for the flush while it makes progress, and gives up after
``$HYBRIDLAB_MLFLOW_FLUSH_TIMEOUT`` seconds (default 15) without any; what is left
goes to ``mlflow_unsent_<run id>_<time>.jsonl`` beside the run's checkpoints, one op
per line. ``replay_file`` (``hybridlab mlflow-replay FILE``, and ``run --resume``
on its own) sends such a file into its run.

The tracking URI: the job's ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``,
else ``sqlite:///mlruns.db`` (a file in the current directory).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Union

from .errors import UserError

DEFAULT_URI = "sqlite:///mlruns.db"
MAX_PARAM_LEN = 6000
SPILL_PREFIX = "mlflow_unsent_"
FLUSH_TIMEOUT_S = 15.0  # seconds without progress before close() gives up on a server that stays away


def tracking_uri(job_uri: Optional[str] = None) -> str:
    return job_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{e.__class__.__name__}: {text[:200]}"


_FILE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def client(uri: str, timeout_s: int = 10, existing: bool = False):
    """An ``MlflowClient`` for ``uri``; a URI MLflow cannot use becomes a one-line UserError.

    ``existing``: the caller only reads (compare, export), so a sqlite file that is not there is a
    mistyped path, reported as such, not a new empty store made (with its folders) where the typo points.

    A sqlite store is opened under an exclusive file lock (``<db>.lock``): MLflow creates and migrates
    its tables on first use, and two processes doing that at once on a new file collide
    ("duplicate column name"); the second one waits and finds the tables made."""
    # fail fast inside MLflow's REST client; callers report or retry themselves
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    missing = missing_sqlite_store(uri) if existing else None
    if missing:
        raise UserError(f"no MLflow store at {missing} (tracking URI {uri!r}): the file does not "
                        f"exist; check --uri or MLFLOW_TRACKING_URI (a run's store is made by `hybridlab run`)")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    errors = (MlflowException, ValueError, OSError) + _sql_errors()
    try:
        with _sqlite_init_lock(uri):
            c = MlflowClient(tracking_uri=uri)
            if uri.startswith("sqlite:"):
                c.search_experiments(max_results=1)  # create (or migrate) the tables now, under the lock
            return c
    except errors as e:
        u, hint = str(uri), ""
        if "://" not in u and (u.startswith(("/", ".", "~")) or u.endswith(_FILE_SUFFIXES)):
            hint = f" (did you mean sqlite:///{os.path.expanduser(u)}?)"
        raise UserError(f"cannot use MLflow tracking URI {uri!r}{hint}: {_short(e)}") from None


def sqlite_file(uri: str) -> Optional[Path]:
    """The absolute database file of a ``sqlite:///`` URI (its query string dropped); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(os.path.abspath(uri[len("sqlite:///"):].split("?", 1)[0]))


def missing_sqlite_store(uri: str) -> Optional[Path]:
    """The database file of a ``sqlite:///`` URI when it does not exist (else None: there, or not sqlite)."""
    db = sqlite_file(uri)
    return db if db is not None and ":memory:" not in uri and not db.is_file() else None


def _sql_errors() -> tuple:
    try:
        from sqlalchemy.exc import SQLAlchemyError

        return (SQLAlchemyError,)
    except ImportError:
        return ()


def artifacts_beside(uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment of a sqlite store keeps its artifacts: ``mlruns/<experiment>`` beside the
    database file, so that the file and that folder are the whole store (MLflow's default is ./mlruns of
    whatever folder the first run started in: a store copied off a GPU machine came back without
    the job.yaml that --resume-sweep reads). None (MLflow's default) for other stores."""
    db = sqlite_file(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", experiment) or "experiment"
    return (db.parent / "mlruns" / safe).as_uri()


class _sqlite_init_lock:
    """``flock`` on ``<db file>.lock`` for a ``sqlite:///`` URI; nothing for other stores."""

    def __init__(self, uri: str):
        db = sqlite_file(uri) if ":memory:" not in uri else None
        self.path = None if db is None else f"{db}.lock"
        self.fd = None

    def __enter__(self):
        if self.path and os.path.isdir(os.path.dirname(self.path)):
            import fcntl

            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        return False


# ---------------------------------------------------------------- ops


@dataclass
class LogMetrics:
    kind: ClassVar[str] = "metrics"
    run_id: str
    metrics: list  # mlflow.entities.Metric

    def send(self, c) -> None:
        c.log_batch(self.run_id, metrics=self.metrics, synchronous=True)

    def to_json(self) -> dict:
        return {"kind": self.kind, "run_id": self.run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self.metrics]}

    @classmethod
    def from_json(cls, d: dict) -> "LogMetrics":
        from mlflow.entities import Metric

        return cls(d["run_id"], [Metric(k, float(v), int(ts), int(st)) for k, v, ts, st in d["metrics"]])


@dataclass
class LogBatch:
    kind: ClassVar[str] = "batch"
    run_id: str
    params: list = field(default_factory=list)  # mlflow.entities.Param
    tags: list = field(default_factory=list)  # mlflow.entities.RunTag

    def send(self, c) -> None:
        c.log_batch(self.run_id, params=self.params, tags=self.tags, synchronous=True)

    def to_json(self) -> dict:
        return {"kind": self.kind, "run_id": self.run_id, "params": {p.key: p.value for p in self.params},
                "tags": {t.key: t.value for t in self.tags}}

    @classmethod
    def from_json(cls, d: dict) -> "LogBatch":
        from mlflow.entities import Param, RunTag

        return cls(d["run_id"], [Param(k, v) for k, v in d.get("params", {}).items()],
                   [RunTag(k, v) for k, v in d.get("tags", {}).items()])


@dataclass
class LogText:
    kind: ClassVar[str] = "text"
    run_id: str
    text: str
    artifact_file: str

    def send(self, c) -> None:
        c.log_text(self.run_id, self.text, self.artifact_file)

    def to_json(self) -> dict:
        return {"kind": self.kind, "run_id": self.run_id, "artifact_file": self.artifact_file, "text": self.text}

    @classmethod
    def from_json(cls, d: dict) -> "LogText":
        return cls(d["run_id"], d["text"], d["artifact_file"])


@dataclass
class Terminate:
    kind: ClassVar[str] = "terminate"
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    end_time: int = field(default_factory=lambda: int(time.time() * 1000))  # when it ended, not when it was sent

    def send(self, c) -> None:
        c.set_terminated(self.run_id, status=self.status, end_time=self.end_time)

    def to_json(self) -> dict:
        return {"kind": self.kind, "run_id": self.run_id, "status": self.status, "end_time": self.end_time}

    @classmethod
    def from_json(cls, d: dict) -> "Terminate":
        return cls(d["run_id"], d["status"], int(d.get("end_time") or time.time() * 1000))


Op = Union[LogMetrics, LogBatch, LogText, Terminate]
OPS = {cls.kind: cls for cls in (LogMetrics, LogBatch, LogText, Terminate)}


def op_from_json(d: dict) -> Op:
    if not isinstance(d, dict) or d.get("kind") not in OPS:
        raise ValueError(f"not a tracker op: {str(d)[:80]}")
    return OPS[d["kind"]].from_json(d)


# ---------------------------------------------------------------- the tracker


def _transient_errors() -> tuple:
    """What a send may raise while the store is away (server down, sqlite busy)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError) + _sql_errors()  # requests' errors are OSErrors


class Tracker:
    """A buffered MLflow client for one tracking URI."""

    def __init__(self, uri: str, retry_max_s: float = 10.0):
        # fail fast inside MLflow's REST client; this class does the retrying
        self.uri = uri
        self.client = client(uri, timeout_s=5)
        self.retry_max_s = retry_max_s
        self.transient = _transient_errors()
        self._ops: deque = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._give_up = False
        self._outage_since: Optional[float] = None
        self._last_progress = time.time()
        self.warnings = 0
        self._thread = threading.Thread(target=self._drain, name="hybridlab-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ synchronous (start of a run)

    def _sync(self, what: str, fn, *args, attempts: int = 5, **kwargs):
        """Call the store now; a busy store (two runs creating tables at once) is retried briefly."""
        for i in range(attempts):
            try:
                return fn(*args, **kwargs)
            except self.transient as e:
                if i == attempts - 1 or getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise UserError(f"MLflow tracking at {self.uri} failed while {what}: {_short(e)}") from None
                time.sleep(0.5 * (i + 1))

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._sync("looking up the experiment", self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self._sync("restoring the experiment", self.client.restore_experiment, exp.experiment_id)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=artifacts_beside(self.uri, name))
        except MlflowException:  # a concurrent creator won the race
            exp = self._sync("creating the experiment", self.client.get_experiment_by_name, name)
            if exp is None:
                raise UserError(f"MLflow tracking at {self.uri}: cannot create experiment {name!r}") from None
            return exp.experiment_id

    def create_run(self, experiment: str, run_name: str, tags: dict, parent_run_id: Optional[str] = None) -> str:
        from hybridlab.jobs.record import Tag

        exp_id = self.experiment_id(experiment)
        tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            tags[Tag.PARENT] = parent_run_id
        run = self._sync("creating the run", self.client.create_run, exp_id, tags=tags, run_name=run_name)
        return run.info.run_id

    def get_run(self, run_id: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise UserError(f"no MLflow run {run_id!r} in {self.uri}") from None
            raise UserError(f"MLflow tracking at {self.uri} failed while reading run {run_id}: {_short(e)}") from None
        except self.transient as e:
            raise UserError(f"MLflow tracking at {self.uri} failed while reading run {run_id}: {_short(e)}") from None

    def last_step(self, run_id: str, key: str) -> int:
        """The highest step ``key`` was logged at in a run (0: never)."""
        hist = self._sync("reading the run's metrics", self.client.get_metric_history, run_id, key)
        return max((m.step for m in hist), default=0)

    def reopen(self, run_id: str) -> None:
        self._sync("reopening the run", self.client.update_run, run_id, status="RUNNING")

    # ------------------------------------------------------------ buffered

    def _put(self, op: Op) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    def log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k)[:250], str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._put(LogBatch(run_id, params=items[i:i + 100]))

    def set_tags(self, run_id: str, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._put(LogBatch(run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()]))

    def log_metrics(self, run_id: str, metrics: dict, step: int, timestamp: Optional[float] = None) -> None:
        from mlflow.entities import Metric

        ts = int((timestamp or time.time()) * 1000)
        ms = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if isinstance(v, (int, float))]
        if ms:
            self._put(LogMetrics(run_id, ms))

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._put(LogText(run_id, text, artifact_file))

    def terminate(self, run_id: str, status: str = "FINISHED") -> None:
        self._put(Terminate(run_id, status))

    def pending(self) -> int:
        with self._cv:
            return len(self._ops)

    # ------------------------------------------------------------ the drain thread

    def _next(self) -> Optional[tuple[Op, int]]:
        """(the head op, how many queued ops it stands for): consecutive metric ops of one run merge (<= 1000)."""
        with self._cv:
            while not self._ops and not self._closing:
                self._cv.wait(0.5)
            if not self._ops:
                return None
            head = self._ops[0]
            if not isinstance(head, LogMetrics):
                return head, 1
            merged, n = list(head.metrics), 1
            while n < len(self._ops) and isinstance(self._ops[n], LogMetrics) and self._ops[n].run_id == head.run_id \
                    and len(merged) + len(self._ops[n].metrics) <= 1000:
                merged.extend(self._ops[n].metrics)
                n += 1
            return LogMetrics(head.run_id, merged), n

    def _pop(self, n: int) -> None:
        with self._cv:
            for _ in range(n):
                self._ops.popleft()
            self._last_progress = time.time()
            self._cv.notify_all()

    def _drain(self) -> None:
        delay = 0.5
        while True:
            nxt = self._next()
            if nxt is None:
                return
            op, n = nxt
            try:
                op.send(self.client)
            except Exception as e:  # noqa: BLE001 - the drain thread outlives any client failure; it keeps the op
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
            self._pop(n)

    def close(self, timeout: Optional[float] = None, spill_dirs: Optional[dict] = None,
              default_dir: str = ".") -> list[str]:
        """Flush everything while it makes progress, giving up after ``timeout`` s (default
        $HYBRIDLAB_MLFLOW_FLUSH_TIMEOUT or 15) without any; spill what is left, one file per run
        (``spill_dirs``: run id -> folder, else ``default_dir``). Returns the files written."""
        if timeout is None:
            timeout = float(os.environ.get("HYBRIDLAB_MLFLOW_FLUSH_TIMEOUT", FLUSH_TIMEOUT_S))
        with self._cv:
            self._closing = True
            self._last_progress = time.time()
            self._cv.notify_all()
            while self._ops and time.time() - self._last_progress < timeout:
                self._cv.wait(min(1.0, max(0.05, timeout - (time.time() - self._last_progress))))
            self._give_up = True
            self._cv.notify_all()
            left = list(self._ops)
        self._thread.join(timeout=10)
        if not left:
            return []
        by_run: dict[str, list[Op]] = {}
        for op in left:
            by_run.setdefault(op.run_id, []).append(op)
        files, stamp = [], int(time.time())
        for run_id, ops in by_run.items():
            folder = Path((spill_dirs or {}).get(run_id) or default_dir)
            path = folder / f"{SPILL_PREFIX}{run_id}_{stamp}.jsonl"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with open(path, "w") as f:
                    for op in ops:
                        f.write(json.dumps(op.to_json()) + "\n")
            except OSError as e:
                _warn(f"cannot save {len(ops)} unsent MLflow writes to {path}: {e}")
                continue
            files.append(str(path))
            _warn(f"MLflow at {self.uri} stayed unreachable: {len(ops)} writes of run {run_id} saved to {path}; "
                  f"send them later with: hybridlab mlflow-replay {path}")
        return files


# ---------------------------------------------------------------- spill files


def spill_files(run_id: str, folders) -> list[str]:
    """The not-yet-replayed spill files of a run in ``folders``, oldest first."""
    found = set()
    for d in folders:
        if d:
            found.update(glob.glob(os.path.join(d, f"{SPILL_PREFIX}{run_id}_*.jsonl")))
    return sorted(found, key=lambda p: (os.path.getmtime(p), p))


def replay_file(path: str, uri: Optional[str] = None, mlflow_client=None) -> tuple[int, set]:
    """Send a spill file's ops into MLflow in order; rename it ``*.replayed``. (ops sent, run ids)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e.__class__.__name__})") from None
    ops = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ops.append(op_from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{i}: not a line of an mlflow_unsent file ({e})") from None
    c = mlflow_client or client(tracking_uri(uri))
    transient = _transient_errors()
    for i, op in enumerate(ops, 1):
        try:
            op.send(c)
        except transient as e:
            raise UserError(f"{path}: replaying op {i} of {len(ops)} ({op.kind}, run {op.run_id}) failed: {_short(e)}; "
                            f"the file is kept, run the replay again") from None
    p.rename(p.with_name(p.name + ".replayed"))
    return len(ops), {op.run_id for op in ops}


def check_reachable(uri: str) -> None:
    """Raise UserError when an http(s) tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
            r.read()
    except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
        raise UserError(f"MLflow tracking server at {uri} is not reachable ({_short(e)})") from None


UI_STOP_GRACE_S = 10.0


def run_ui(store: str, host: str, port: int) -> int:
    """``mlflow ui`` on ``store`` in its own process group; SIGINT/SIGTERM stop the whole group (the server
    and its workers: SIGTERM, SIGKILL after a grace period) before this returns 128 + the signal.
    Otherwise the UI's own exit status."""
    import signal
    import subprocess

    print(f"MLflow UI for {store} at http://{host}:{port}  (Ctrl-C stops it)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port)]
    child = subprocess.Popen(cmd, start_new_session=True)
    got: list[int] = []

    def stop(signum, frame):  # only signal here: the main thread is inside child.wait()
        if not got:
            _signal_group(child.pid, signal.SIGTERM)
            timer = threading.Timer(UI_STOP_GRACE_S, _kill_if_alive, (child,))
            timer.daemon = True
            timer.start()
        got.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 128 + got[0] if got else code


def _kill_if_alive(child) -> None:
    """SIGKILL the UI's group while its leader lives (then the group id is still the UI's, never reused)."""
    import signal

    if child.poll() is None:
        _signal_group(child.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the group is gone
        pass


def git_sha(start: Optional[str] = None) -> str:
    import subprocess

    here = start or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        pass
    return "unknown"

