"""What a run's workers are waiting for, said while no worker has reported yet.

Ray Train retries a placement group that cannot be placed every minute, silently; a run whose
resources never come (a node gone, a GPU busy with another job, a `custom` resource nobody has)
would otherwise sit at its "MLflow run …" line (or after a worker's failure) with no word. The
driver says, after a minute and then every three, whether the placement is still pending or the
workers are placed and starting, beside what the cluster has free.
"""

from __future__ import annotations

FIRST_NOTE_S = 60.0  # Ray Train's own placement-group timeout: one retry has passed
NOTE_EVERY_S = 180.0


def _amounts(d: dict) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in d.items())


def pending_workers_line(waited_s: float, workers: int, per_worker: dict, strategy: str) -> str:
    """One line: the ask, the state of the cluster's placement groups, and the cluster's free resources."""
    import ray
    from ray.util import placement_group_table

    ask = f"no worker has reported after {waited_s:.0f} s (asked: {workers} × {{{_amounts(per_worker)}}}, {strategy})"
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        free, total = ray.available_resources(), ray.cluster_resources()
        states = [pg.get("state") for pg in placement_group_table().values()]
    except Exception as e:  # the note must never take the run down
        return f"{ask}; the cluster's state could not be read ({type(e).__name__}: {e})"
    pending = sum(s in ("PENDING", "RESCHEDULING") for s in states)
    if pending:
        where = f"{pending} placement group(s) waiting for resources"
    elif "CREATED" in states:
        where = "placed; the worker processes are starting"
    else:
        where = "no placement group yet"
    have = ", ".join(f"{k} {free.get(k, 0):g} of {total.get(k, 0):g} free" for k in per_worker)
    return f"{ask}: {where}; cluster: {len(alive)} node(s) alive, {have}"
