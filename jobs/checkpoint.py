"""Checkpoints: DeepSpeed state staged in a private temp dir, then committed through Ray Train.

A checkpoint directory holds DeepSpeed's files under ``ds/`` (each rank writes
its own shards; Ray Train merges the ranks' uploads into one directory) and
``hybridlab.json`` (step, tokens, world size, ZeRO stage), written by rank 0, and,
for data read as a stream, ``data_state/rank_<r>.json`` (each rank's position in it).

Atomicity: nothing is written where a checkpoint lives until it is whole on the
local disk; Ray Train registers a checkpoint (``checkpoint_manager_snapshot.json``)
only after every rank's upload finished, so the latest *registered* checkpoint is
always complete, and older ones are deleted only after a newer one is registered.
Before writing, every rank checks the free space of the staging and the storage
disks; when a checkpoint cannot fit, all ranks stop together with
:class:`CheckpointDiskFull` and the previous checkpoint is untouched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from hybridlab.jobs.spec import fp32_parameters

DS_TAG = "ds"
META = "hybridlab.json"
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


class CheckpointDiskFull(RuntimeError):
    pass


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def staging_root(storage_uri: str) -> str:
    """Where ranks stage checkpoints: beside the storage when it is a local path."""
    if is_local(storage_uri):
        root = Path(local_path(storage_uri)) / ".staging"
        root.mkdir(parents=True, exist_ok=True)
        return str(root)
    return tempfile.gettempdir()


def dir_bytes(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def estimate_bytes(n_params: int, zero_stage: int, world: int, precision: str) -> tuple[int, int]:
    """(bytes this rank writes, bytes of the whole checkpoint): weights + AdamW moments + master copy."""
    per_param = 4 + 8 + (0 if fp32_parameters(precision) else 4)
    total = int(n_params * per_param * 1.05) + (1 << 16)
    mine = total // world if zero_stage >= 1 else total
    return mine, total


def free_bytes(path: str) -> int:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def space_problem(staging: str, storage_uri: str, mine: int, total: int) -> Optional[str]:
    """A message when the next checkpoint does not fit, else None."""
    free_stage = free_bytes(staging)
    need_stage = mine
    if is_local(storage_uri):
        store = local_path(storage_uri)
        same = os.stat(free_path(store)).st_dev == os.stat(free_path(staging)).st_dev
        # same disk: the staged copies (all ranks may stage here) and the committed copy coexist
        need_store = total + (total if same else 0)
        free_store = free_bytes(store)
        if free_store < need_store:
            return f"{_mb(free_store)} free on {store}, the checkpoint needs about {_mb(need_store)}"
    if free_stage < need_stage:
        return f"{_mb(free_stage)} free on {staging}, the checkpoint needs about {_mb(need_stage)}"
    return None


def free_path(path: str) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def is_disk_full(exc: BaseException) -> bool:
    """True for an out-of-space error, also when torch.save wraps it in a RuntimeError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left" in text or "Disk quota exceeded" in text or "file write failed" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def new_staging_dir(root: str, step: int, rank: int) -> str:
    return tempfile.mkdtemp(prefix=f"step_{step:08d}.rank{rank}.", dir=root)


def write_meta(dirpath: str, meta: dict) -> None:
    tmp = os.path.join(dirpath, META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(dirpath, META))


def read_meta(dirpath: str) -> dict:
    with open(os.path.join(dirpath, META)) as f:
        return json.load(f)


DATA_STATE = "data_state"


def write_data_state(dirpath: str, rank: int, state: Optional[dict]) -> None:
    """One rank's position in its data stream (nothing for seeded data, whose position is the step)."""
    if state is None:
        return
    d = os.path.join(dirpath, DATA_STATE)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"rank_{rank}.json"), "w") as f:
        json.dump(state, f)


def read_data_state(dirpath: str, rank: int) -> Optional[dict]:
    p = os.path.join(dirpath, DATA_STATE, f"rank_{rank}.json")
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def checkpoint_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_registered(run_dir: str) -> Optional[str]:
    """The newest checkpoint Ray Train registered for a run (local storage), or None."""
    snap = Path(run_dir) / "checkpoint_manager_snapshot.json"
    if not snap.exists():
        return None
    try:
        data = json.loads(snap.read_text())
    except (OSError, ValueError):
        return None
    latest = data.get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    if not name:
        results = data.get("checkpoint_results") or []
        if not results:
            return None
        name = results[-1].get("checkpoint_dir_name")
    path = Path(run_dir) / name if name else None
    return str(path) if path and path.exists() else None
