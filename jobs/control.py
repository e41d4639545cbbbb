"""The two channels between the driver and its workers, off the training loop's path.

* :class:`ProgressSender` (rank 0 -> driver): progress messages (``jobs.record``)
  go into a local queue; a thread delivers them to the driver's ``ray.util.queue.Queue``,
  so a step never waits on a Ray round trip.
* :class:`RunControl` / :class:`StopRequest` (driver -> every rank): the driver asks
  the run to stop (SIGINT/SIGTERM); each rank polls without blocking, and the ranks
  agree at the next log point (the flag rides on the loss all-reduce).
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

_CLOSE = object()


class ProgressSender:
    """Delivers rank 0's messages in order from a background thread; other ranks send nothing."""

    def __init__(self, sink, rank: int):
        self.sink, self.rank = sink, rank
        self._q: queue.Queue = queue.Queue()
        self._warned = False
        self._thread: Optional[threading.Thread] = None
        if rank == 0 and sink is not None:
            self._thread = threading.Thread(target=self._deliver, name="hybridlab-progress-send", daemon=True)
            self._thread.start()

    def send(self, msg) -> None:
        if self.rank != 0:
            return
        self._send(msg)

    def send_failure(self, failure) -> None:
        """Any rank's failure, delivered before the exception propagates (blocking, bounded)."""
        if self.rank == 0:
            self._send(failure)
            self.close(timeout=15)
        elif self.sink is not None:
            try:
                self.sink.put(failure, timeout=15)
            except Exception:  # noqa: BLE001 - the driver is gone: the exception still reaches Ray
                pass
        else:
            print(f"[hybridlab] {failure.error}", flush=True)

    def _send(self, msg) -> None:
        if self._thread is None:
            print(f"[hybridlab] {msg}", flush=True)
            return
        self._q.put(msg)

    def _deliver(self) -> None:
        from ray.exceptions import RayError

        while True:
            msg = self._q.get()
            if msg is _CLOSE:
                return
            try:
                self.sink.put(msg, timeout=30)
            except (RayError, queue.Full, ConnectionError, TimeoutError) as e:  # the driver went away: train on
                if not self._warned:
                    print(f"[hybridlab] warning: progress sink unavailable ({e.__class__.__name__}); continuing",
                          flush=True)
                    self._warned = True

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what is queued (up to ``timeout`` s)."""
        if self._thread is not None:
            self._q.put(_CLOSE)
            self._thread.join(timeout)


def make_run_control():
    """A tiny async actor holding the run's stop flag (no CPU reserved; one pending call per rank)."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class RunControl:
        def __init__(self):
            self._stop = asyncio.Event()
            self.reason = ""

        async def request_stop(self, reason: str = "") -> None:
            self.reason = reason
            self._stop.set()

        async def wait_stop(self, timeout: float = 3600.0) -> bool:
            """Returns True when a stop is requested, False after ``timeout`` (the caller asks again)."""
            try:
                await asyncio.wait_for(self._stop.wait(), timeout)
            except asyncio.TimeoutError:
                return False
            return True

    return RunControl.remote()


class StopRequest:
    """A rank's view of the driver's stop flag: ``requested()`` never blocks (``ray.wait(timeout=0)``)."""

    def __init__(self, control):
        self.control = control
        self._ref = control.wait_stop.remote() if control is not None else None
        self._seen = False

    def requested(self) -> bool:
        if self._seen or self._ref is None:
            return self._seen
        import ray
        from ray.exceptions import RayError

        ready, _ = ray.wait([self._ref], timeout=0)
        if not ready:
            return False
        try:
            self._seen = bool(ray.get(ready[0]))
        except RayError:  # the driver (and its control actor) is gone: stop as well
            self._seen = True
        if not self._seen:  # the wait timed out: ask again
            self._ref = self.control.wait_stop.remote()
        return self._seen
