"""Nsight Compute's per-kernel counters as a table: what limits each kernel (issue 14's gap analysis).

``parse_ncu_csv(text, metrics)`` reads ``ncu --csv --print-units base --metrics ...`` output into one dict per
kernel launch; ``summarize`` folds launches by kernel name (time-weighted percentages, GB/s from the DRAM
bytes); ``markdown`` prints them. ``scripts/kernel_rates.py`` runs ncu over one Mamba-3 layer's fwd+bwd.
"""

from __future__ import annotations

import csv
import io
import re

METRICS = {
    "gpu__time_duration.sum": "ns",
    "dram__bytes_read.sum": "read",
    "dram__bytes_write.sum": "write",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
    "launch__registers_per_thread": "regs",
}
# the tensor-core pipe's share of cycles (Hopper's wgmma pipe, and the mma pipe older kernels use): read
# when this ncu knows the names, else left out (the run is retried without them)
TENSOR_METRICS = {
    "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active": "gmma_pct",
    "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active": "hmma_pct",
}


def short_name(name: str) -> str:
    """A kernel's name without its return type, namespaces' template arguments and parameter list."""
    name = re.sub(r"^void\s+", "", name.strip())
    depth, out = 0, []
    for ch in name:  # drop everything inside <...> and (...)
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out).split("::")[-1][:60] or name[:60]


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


def parse_ncu_csv(text: str, metrics: dict) -> list[dict]:
    """One dict per profiled kernel launch (``--csv --print-units base`` output; other lines ignored)."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    launches: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        key = metrics.get(row.get("Metric Name", ""))
        if key is None:
            continue
        k = launches.setdefault(row["ID"], {"kernel": short_name(row["Kernel Name"])})
        value = _number(row["Metric Value"])
        if value == value:  # "n/a" (a counter this kernel does not have, e.g. wgmma in a kernel without it) is left out
            k[key] = value
    return list(launches.values())


def summarize(launches: list[dict]) -> list[dict]:
    """Per kernel name: calls, time, bytes, GB/s and the time-weighted percentages; most time first."""
    by: dict[str, dict] = {}
    for k in launches:
        s = by.setdefault(k["kernel"], {"kernel": k["kernel"], "calls": 0, "ns": 0.0, "bytes": 0.0, "_w": {}, "_t": {}})
        s["calls"] += 1
        s["ns"] += k.get("ns", 0.0)
        s["bytes"] += k.get("read", 0.0) + k.get("write", 0.0)
        s["regs"] = k.get("regs")
        for key in ("dram_pct", "sm_pct", "occupancy_pct", "gmma_pct", "hmma_pct"):
            if key in k:  # weighted by the time of the launches that have the counter
                s["_w"][key] = s["_w"].get(key, 0.0) + k[key] * k.get("ns", 0.0)
                s["_t"][key] = s["_t"].get(key, 0.0) + k.get("ns", 0.0)
    rows = []
    for s in by.values():
        w, t = s.pop("_w"), s.pop("_t")
        s.update({key: v / t[key] for key, v in w.items() if t[key]})
        s["ms"] = s["ns"] / 1e6
        s["gb_s"] = s["bytes"] / s["ns"] if s["ns"] else float("nan")  # bytes per ns = GB/s
        rows.append(s)
    return sorted(rows, key=lambda r: -r["ns"])


def markdown(title: str, rows: list[dict]) -> str:
    total_ms = sum(r["ms"] for r in rows)
    total_b = sum(r["bytes"] for r in rows)
    tensor = any("gmma_pct" in r or "hmma_pct" in r for r in rows)
    head = "| kernel | calls | ms | share | DRAM MB | GB/s | DRAM % peak | SM % | occupancy % | regs |"
    if tensor:
        head += " tensor pipe % |"
    out = [f"**{title}**: {total_ms:.3f} ms of kernels, {total_b / 1e6:.1f} MB DRAM traffic "
           f"({total_b / max(total_ms, 1e-9) / 1e6:.0f} GB/s overall)", "", head,
           "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| `{r['kernel']}` | {r['calls']} | {r['ms']:.3f} | {100 * r['ms'] / max(total_ms, 1e-9):.1f} % | "
                f"{r['bytes'] / 1e6:.1f} | {r['gb_s']:.0f} | {r.get('dram_pct', float('nan')):.1f} | "
                f"{r.get('sm_pct', float('nan')):.1f} | {r.get('occupancy_pct', float('nan')):.1f} | "
                f"{'' if r.get('regs') is None else int(r['regs'])} |")
        if tensor:
            line += f" {max(r.get('gmma_pct', 0.0), r.get('hmma_pct', 0.0)):.1f} |"  # Hopper GEMMs use one or the other
        out.append(line)
    return "\n".join(out)
