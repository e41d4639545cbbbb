"""Shared memory, registers and spills of the ``ssm_scan_fused`` Triton kernels, compiled for a GPU
that need not be here (Hopper by default).

    python -m hybridlab.kernels.bench.triton_resources [--set ci|default|layer|tests|all] [--arch 90]
        [--only REGEX] [--jobs N] [--limit-kib 227] [--margin-kib 200] [--max-spill 4096] [--json PATH]

For every case (dtype, rank R, d_state N, headdim P, angles A, norm / bias / rotary / seq_idx, whether the
forward stores states for a backward) it builds the launches exactly as the op does
(``triton_fused.fwd_launches`` / ``bwd_launches`` on "meta" tensors: no memory, no GPU), compiles
each kernel with ``triton.compile`` for ``GPUTarget("cuda", ARCH, 32)`` and reads the shared memory
from the compiled metadata, and the registers and spills from ``ptxas -v`` run with the ptxas triton's
own pipeline uses for that arch (triton 3.9: ``ptxas-blackwell`` for sm_90+, since its PTX is newer than
the older bundled ``ptxas`` accepts; triton 3.6: ``knobs.nvidia.ptxas``); failing that, from the cubin
(``cuobjdump --dump-resource-usage``: registers, and stack + spills together); a figure that cannot be
had here prints as ``n/a`` with a note saying why. On a machine with a GPU of that arch it also loads
each kernel as a launch would and prints the driver's registers / spills (a kernel the driver refuses,
e.g. OutOfResources, fails the run).

It prints a table and exits 1 when a kernel does not compile, needs more shared memory than
``--limit-kib`` (Hopper: 227 KiB = 232448 B per block) or more registers than a block has, or the
driver refuses it: what would make a launch fail. Rows above ``--margin-kib`` of shared memory, or
spilling more than ``--max-spill`` bytes per thread (slow, not wrong), are marked; ``--fail-on-spill``
makes the latter failures too. Exit 2: bad arguments;
exit 3: no usable triton / ptxas here (nothing was checked). Success: the last line reads
"N rows, all within the limits".

Sets: ``ci`` (float32 R 4, d_state 128: ~20 s), ``default`` (that in bf16 and fp32), ``layer`` (bf16 / fp32 x
d_state 64 / 128 x headdim 64 / 128 x R 1 / 2 / 4), ``tests`` (the GPU tests' shapes), ``all``. The numbers
are those of the triton installed here; compiles are cached by triton (``TRITON_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

KIB = 1024
HOPPER_SHARED = 227 * KIB  # the most dynamic shared memory one block may use on sm_90 (232448 bytes)

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class Case:
    """One launch class of ``ssm_scan_fused``: what decides the kernels' specialisations."""

    name: str
    dtype: str  # "bf16" | "fp32" | "fp16"
    r: int
    n: int
    p: int = 64
    h: int = 64
    A: int | None = None  # angles; None: n // 4 (the layer's rope_fraction 0.5)
    norm: bool = True
    bias: bool = True
    seq: bool = False
    store: bool = True  # the forward stores h' per chunk (training); False: inference forward only
    chunk: int | None = None  # positions per chunk; None: the layer's default 64 / R
    b: int = 2
    l: int = 2048

    @property
    def angles(self) -> int:
        return self.n // 4 if self.A is None else self.A


def layer_cases() -> list[Case]:
    """The Mamba-3 layer's shapes: headdim 64 / 128, d_state 64 / 128, R 1 / 2 / 4, chunk 64 / R, norm + bias +
    rotary (training: states stored), in bf16 and fp32."""
    return [Case(f"layer {dt} R{r} N{n} P{p}", dt, r, n, p=p) for dt in ("bf16", "fp32") for p in (64, 128)
            for n in (64, 128) for r in (1, 2, 4)]


def variant_cases() -> list[Case]:
    """The optional features on and off (each changes the kernels' constexprs) at R 1 and 4, N 128."""
    out = []
    for dt in ("bf16", "fp32"):
        for r in (1, 4):
            out += [Case(f"bare {dt} R{r} N128", dt, r, 128, norm=False, bias=False, A=0),
                    Case(f"packed {dt} R{r} N128", dt, r, 128, seq=True),
                    Case(f"inference {dt} R{r} N128", dt, r, 128, store=False)]
    return out


def test_cases() -> list[Case]:
    """The GPU tests' shapes (tests/test_ssm_fused.py): 64 heads x 64, A = N / 4, norm + bias, l 1000."""
    out = [Case(f"gpu-test {dt} R{r} N128", dt, r, 128, l=1000) for dt in ("bf16", "fp32") for r in (1, 4)]
    out.append(Case("gpu-test packed fp32 R4 N128", "fp32", 4, 128, h=8, seq=True, l=1000))
    return out


def default_cases() -> list[Case]:
    """A quick subset: the largest forward and backward tiles, bf16 and fp32 (R 4, N 128, P 64)."""
    return [Case(f"layer {dt} R4 N128 P64", dt, 4, 128) for dt in ("bf16", "fp32")]


def ci_cases() -> list[Case]:
    """The cheapest meaningful check (CI, ~20 s on one core): the float32 R 4, N 128 class whose forward needed
    393 KiB of shared memory on the first H200 run."""
    return [Case("layer fp32 R4 N128 P64", "fp32", 4, 128)]


SETS = {"default": default_cases, "ci": ci_cases, "layer": layer_cases, "tests": test_cases,
        "all": lambda: layer_cases() + variant_cases() + test_cases()}


def _fused_module():
    return importlib.import_module("hybridlab.kernels.ssm_scan.triton_fused")


def case_launches(case: Case) -> list:
    """The ``Launch``es of one forward (+ backward when ``case.store``), built on meta tensors."""
    tf = _fused_module()
    from hybridlab.kernels.ssm_scan import chunk_rows

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[case.dtype]
    m, f32 = "meta", torch.float32
    b, l, h, r, n, p, A = case.b, case.l, case.h, case.r, case.n, case.p, case.angles
    proj = torch.empty(b, l, 2 * r * n, device=m, dtype=dt)  # B, C as views of one projection, as in the layer
    B, C = proj[..., : r * n].view(b, l, r, n), proj[..., r * n :].view(b, l, r, n)
    x = torch.empty(b, l, h, p, device=m, dtype=dt)
    phase = torch.empty(b, l, h, A, device=m, dtype=f32) if A else None
    w = torch.empty(n, device=m, dtype=dt) if case.norm else None
    bias = torch.empty(h, r, n, device=m, dtype=dt) if case.bias else None
    mx = torch.empty(h, r, p, device=m, dtype=dt) if r > 1 else None
    la = torch.empty(b, l, h, device=m, dtype=f32)
    h0 = torch.empty(b, h, p, n, device=m, dtype=f32)
    k0 = torch.empty(b, h, r, n, device=m, dtype=dt)
    v0 = torch.empty(b, h, r, p, device=m, dtype=dt)
    seq = torch.empty(b, l, device=m, dtype=torch.int32) if case.seq else None
    block, why = chunk_rows(r, case.chunk)
    if why:
        raise ValueError(f"case {case.name!r}: {why}")
    (y, hf, hs, rstd), launches = tf.fwd_launches(B, C, phase, w, w, bias, bias, x, mx, la, la, la, h0, k0, v0, seq, 1e-5,
                                                  block, case.store)
    if case.store:
        _, bwd = tf.bwd_launches(B, C, phase, w, w, bias, bias, x, mx, la, la, la, k0, v0, seq, hs, rstd, y, hf, 1e-5, block)
        launches += bwd
    return launches


def _signature(launch):
    """(signature, constexprs, attrs) for ``ASTSource``, specialised as triton's launcher would (pointers and
    multiples of 16 get the divisibility hint)."""
    fn = launch.kernel
    names = list(fn.arg_names)
    runtime = [nm for nm in names if nm not in launch.meta]
    if len(runtime) != len(launch.args):
        raise TypeError(f"{fn.__name__}: {len(launch.args)} arguments for {len(runtime)} runtime parameters")
    dns = {names[d] if isinstance(d, int) else d for d in (getattr(fn, "do_not_specialize", None) or ())}
    sig, attrs = {}, {}
    for nm, a in zip(runtime, launch.args):
        idx = (names.index(nm),)
        if isinstance(a, torch.Tensor):
            sig[nm] = "*" + _TY[a.dtype]
            attrs[idx] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[nm] = "i1"
        elif isinstance(a, int):
            sig[nm] = "i32" if -(2**31) <= a < 2**31 else "i64"
            if a % 16 == 0 and nm not in dns:
                attrs[idx] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[nm] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {nm} of type {type(a).__name__}")
    for nm in launch.meta:
        sig[nm] = "constexpr"
    return {nm: sig[nm] for nm in names}, dict(launch.meta), attrs


def compile_launch(launch, arch: int = 90):
    """triton's CompiledKernel of this launch for CUDA sm_<arch> (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _signature(launch)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    opts = backend.parse_options(dict(num_warps=launch.num_warps, num_stages=launch.num_stages))
    return triton.compile(ASTSource(fn=launch.kernel, signature=sig, constexprs=consts, attrs=attrs), target=target,
                          options=opts.__dict__)


def _tool(path) -> str | None:
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def ptxas_path(arch: int = 90) -> str | None:
    """The ptxas triton's own compile pipeline uses for sm_<arch>, or None. Triton 3.9 picks per arch (its
    newer ``ptxas-blackwell`` for sm_90 and up: the PTX it emits for Hopper is too new for the older bundled
    ``ptxas``); triton 3.6 has one ``knobs.nvidia.ptxas``."""
    try:
        from triton.backends.nvidia import compiler as nv

        get = getattr(nv, "get_ptxas", None)
        if get is not None:
            try:
                tool = get(arch)
            except TypeError:  # an older signature without the arch
                tool = get()
            path = _tool(getattr(tool, "path", tool))
            if path:
                return path
    except Exception:  # noqa: BLE001 - no NVIDIA backend: fall through
        pass
    try:
        import triton

        return _tool(triton.knobs.nvidia.ptxas.path)
    except Exception:  # noqa: BLE001 - a triton without knobs: look beside the package
        try:
            import triton

            return _tool(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
        except ImportError:
            return None


def cuobjdump_path() -> str | None:
    try:
        import triton

        return _tool(triton.knobs.nvidia.cuobjdump.path)
    except Exception:  # noqa: BLE001
        try:
            import triton

            return _tool(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
        except ImportError:
            return None


NA = -1  # a figure that could not be had here (printed as "n/a")


def ptxas_usage(ptx: str, arch: int = 90) -> dict:
    """Registers, spill stores / loads and stack frame (bytes per thread) from ``ptxas -v`` (the ptxas triton
    uses for this arch), or NA for each with ``why`` saying what failed."""
    path = ptxas_path(arch)
    if path is None:
        return dict(regs=NA, stack=NA, spill_st=NA, spill_ld=NA, why="no ptxas")
    suffix = "a" if arch == 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}{suffix}", src, "-o",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True)
        if proc.returncode != 0 and "regAllocOptLevel" in proc.stderr:  # an older ptxas without the option
            proc = subprocess.run([path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(d, "k.cubin")],
                                  capture_output=True, text=True)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if ln.strip()), f"exit {proc.returncode}")
        return dict(regs=NA, stack=NA, spill_st=NA, spill_ld=NA, why=f"ptxas {path}: {first.strip()}")
    out = proc.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out)
    return dict(regs=int(regs.group(1)) if regs else NA, stack=int(spill.group(1)) if spill else NA,
                spill_st=int(spill.group(2)) if spill else NA, spill_ld=int(spill.group(3)) if spill else NA, why="")


def cubin_usage(cubin: bytes) -> dict:
    """Registers and local memory (stack + spills, bytes per thread) of a compiled cubin from
    ``cuobjdump --dump-resource-usage``: the fallback when ptxas -v cannot be rerun here."""
    path = cuobjdump_path()
    if path is None or not cubin:
        return dict(regs=NA, stack=NA, spill_st=NA, spill_ld=NA, why="no cuobjdump / cubin")
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "k.cubin")
        with open(f, "wb") as fh:
            fh.write(cubin)
        proc = subprocess.run([path, "--dump-resource-usage", f], capture_output=True, text=True)
    regs, local = re.search(r"REG:(\d+)", proc.stdout), re.search(r"LOCAL:(\d+)", proc.stdout)
    if proc.returncode != 0 or not regs:
        return dict(regs=NA, stack=NA, spill_st=NA, spill_ld=NA, why=f"cuobjdump: {proc.stderr.strip()[:120]}")
    # LOCAL is stack + spills together: reported as the stack, spills unknown (NA)
    return dict(regs=int(regs.group(1)), stack=int(local.group(1)) if local else NA, spill_st=NA, spill_ld=NA,
                why="spills not separable from the stack (cuobjdump LOCAL)")


def kernel_usage(compiled, arch: int = 90) -> dict:
    """Registers / spills of a compiled kernel: ptxas -v first, else the cubin's resource usage."""
    usage = ptxas_usage(compiled.asm.get("ptx", ""), arch)
    if usage["regs"] == NA:
        alt = cubin_usage(compiled.asm.get("cubin", b""))
        if alt["regs"] != NA:
            alt["why"] = f"{usage['why']}; {alt['why']}"
            return alt
    return usage


def _launch_key(launch):
    return (launch.kernel.__name__, tuple(sorted(launch.meta.items())),
            tuple(_TY[a.dtype] if isinstance(a, torch.Tensor) else type(a).__name__ for a in launch.args),
            launch.num_warps, launch.num_stages)


@dataclass
class Row:
    case: str
    kernel: str
    config: str
    shared: int  # bytes per block (NA: the kernel did not compile)
    regs: int  # per thread (NA: not measurable here)
    spill_st: int
    spill_ld: int
    stack: int
    seconds: float
    threads: int = 0
    note: str = ""  # why a figure is NA
    verdict: str = ""
    drv_regs: int = NA  # as the CUDA driver reports them after loading the kernel (only on a GPU of this arch)
    drv_spills: int = NA
    drv_error: str = ""  # the driver refused to load it (e.g. OutOfResources)


def _config_text(launch) -> str:
    m = launch.meta
    parts = [f"{k}={m[k]}" for k in ("BP", "BW", "BR", "BLOCK") if k in m]
    return " ".join(parts + [f"w{launch.num_warps}", f"s{launch.num_stages}"])


def measure(cases, arch: int = 90, log=print) -> list[Row]:
    """Compile every distinct launch of ``cases`` (each once) and return one row per (case, launch). A kernel
    that does not compile gets a row with shared = NA and the error as its note (judged a failure)."""
    done: dict = {}
    rows = []
    for case in cases:
        for launch in case_launches(case):
            key = _launch_key(launch)
            if key not in done:
                t0 = time.time()
                drv = {}
                try:
                    compiled = compile_launch(launch, arch)
                    shared, usage = int(compiled.metadata.shared), kernel_usage(compiled, arch)
                    drv = driver_usage(compiled, arch)
                except Exception as e:  # noqa: BLE001 - a compile error is a finding to report, not a crash
                    msg = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
                    shared, usage = NA, dict(regs=NA, stack=NA, spill_st=NA, spill_ld=NA,
                                             why=f"COMPILE FAILED: {type(e).__name__}: {msg[:160]}")
                done[key] = (shared, usage, time.time() - t0, drv)
            shared, usage, secs, drv = done[key]
            row = Row(case.name, launch.kernel.__name__.strip("_"), _config_text(launch), shared, usage["regs"],
                      usage["spill_st"], usage["spill_ld"], usage["stack"], round(secs, 1),
                      threads=32 * launch.num_warps, note=usage.get("why", ""), **drv)
            rows.append(row)
            if log:
                log(f"  compiled {row.case:32s} {row.kernel:24s} {secs:5.1f} s", file=sys.stderr)
    return rows


def _measure_one(case, arch):
    return measure([case], arch, log=None)


def measure_parallel(cases, arch: int = 90, jobs: int = 1, log=print) -> list[Row]:
    """``measure`` with the cases spread over ``jobs`` fresh processes (compiling is single-threaded)."""
    if jobs <= 1 or len(cases) <= 1:
        return measure(cases, arch, log)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        for case, got in zip(cases, pool.map(_measure_one, cases, [arch] * len(cases))):
            rows += got
            if log:
                log(f"  compiled {case.name:32s} ({sum(r.seconds for r in got):.1f} s)", file=sys.stderr)
    return rows


REGS_PER_BLOCK = 65536  # sm_70 .. sm_100


def gpu_here(arch: int) -> bool:
    """Whether this machine has a CUDA GPU of compute capability ``arch`` (then the driver's figures are read)."""
    try:
        if not torch.cuda.is_available():
            return False
        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor == arch
    except Exception:  # noqa: BLE001
        return False


def driver_usage(compiled, arch: int) -> dict:
    """On a GPU of this arch: load the kernel as a launch would (``_init_handles``) and return the registers and
    spills the driver reports, or the error it raises (OutOfResources: the launch would fail). Else {}."""
    if not gpu_here(arch):
        return {}
    try:
        compiled._init_handles()
    except Exception as e:  # noqa: BLE001 - the finding: this kernel cannot be launched here
        return dict(drv_error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200])
    return dict(drv_regs=int(getattr(compiled, "n_regs", NA) or NA), drv_spills=int(getattr(compiled, "n_spills", NA) or 0))


def judge(rows, limit: int, margin: int, max_spill: int, fail_on_spill: bool = False) -> int:
    """Mark each row; returns the number of failures (did not compile, over the shared-memory limit, more
    registers than a block may have, or spilling more than ``max_spill``). NA figures are not judged."""
    bad = 0
    for row in rows:
        why, fail = [], False
        if row.shared == NA:
            why.append("DID NOT COMPILE")
            fail = True
        elif row.shared > limit:
            why.append(f"SHARED > {limit // KIB} KiB")
            fail = True
        elif row.shared > margin:
            why.append(f"above the {margin // KIB} KiB margin")
        if row.regs != NA and row.regs * row.threads > REGS_PER_BLOCK:
            why.append(f"REGS x THREADS > {REGS_PER_BLOCK}")
            fail = True
        if row.spill_st != NA and row.spill_st > max_spill:
            # launchable and correct, only slow: marked; a failure only with --fail-on-spill
            why.append(f"SPILLS > {max_spill} B (slow)")
            fail = fail or fail_on_spill
        if row.drv_error:
            why.append(f"DRIVER REFUSES: {row.drv_error}")
            fail = True
        row.verdict = "; ".join(why) or "ok"
        bad += fail
    return bad


def _fig(v: int, scale: float = 1.0, fmt: str = "d") -> str:
    return "n/a" if v == NA else format(v / scale if scale != 1.0 else v, fmt)


def table(rows) -> str:
    head = f"{'case':32s} {'kernel':24s} {'config':28s} {'shared KiB':>10s} {'regs':>5s} {'spill st/ld B':>14s}  verdict"
    drv = any(r.drv_regs != NA or r.drv_error for r in rows)
    if drv:
        head = head.replace("  verdict", f"  {'driver regs/spills':>18s}  verdict")
    lines = [head, "-" * len(head)]
    for r in rows:
        spill = f"{_fig(r.spill_st)}/{_fig(r.spill_ld)}"
        extra = f"  {_fig(r.drv_regs) + '/' + _fig(r.drv_spills):>18s}" if drv else ""
        lines.append(f"{r.case:32s} {r.kernel:24s} {r.config:28s} {_fig(r.shared, KIB, '.1f'):>10s} {_fig(r.regs):>5s} "
                     f"{spill:>14s}{extra}  {r.verdict}")
    notes = sorted({r.note for r in rows if r.note})
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def check_available() -> str:
    """'' when this machine can compile for CUDA (triton with its NVIDIA backend and a ptxas), else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton is not importable ({e})"
    if ptxas_path() is None:
        return "no ptxas (triton's bundled one is missing; set TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 (the kernels are interpreted, not compiled)"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hybridlab.kernels.bench.triton_resources", description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="default", help=f"cases: {', '.join(SETS)} (default: default)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90: Hopper)")
    ap.add_argument("--limit-kib", type=float, default=HOPPER_SHARED / KIB, help="fail above this shared memory (KiB)")
    ap.add_argument("--margin-kib", type=float, default=200.0, help="mark rows above this shared memory (KiB)")
    ap.add_argument("--max-spill", type=int, default=4096, help="mark rows above this many spill-store bytes per thread")
    ap.add_argument("--fail-on-spill", action="store_true", help="count rows above --max-spill as failures too")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--only", default=None, help="keep the set's cases whose name matches this regex (e.g. 'fp32|P128')")
    ap.add_argument("--jobs", type=int, default=0, help="cases compiled at once (default: CPU cores, at most 8)")
    args = ap.parse_args(argv)
    if args.set not in SETS:
        print(f"triton_resources: --set {args.set!r}: choose one of {', '.join(SETS)}", file=sys.stderr)
        return 2
    why = check_available()
    if why:
        print(f"triton_resources: cannot compile here: {why}", file=sys.stderr)
        return 3
    import triton

    print(f"triton {triton.__version__}, target sm_{args.arch}, ptxas {ptxas_path(args.arch)}")
    if gpu_here(args.arch):
        print(f"GPU here: {torch.cuda.get_device_name()} (the driver's registers / spills, and whether it loads each "
              "kernel, are read too)")
    else:
        print(f"no sm_{args.arch} GPU here: shared memory from the compiled metadata, registers / spills from ptxas -v "
              "(the driver's own figures need that GPU)")
    cases = SETS[args.set]()
    if args.only:
        try:
            pat = re.compile(args.only)
        except re.error as e:
            print(f"triton_resources: --only {args.only!r}: {e}", file=sys.stderr)
            return 2
        cases = [c for c in cases if pat.search(c.name)]
        if not cases:
            print(f"triton_resources: --only {args.only!r} keeps none of the {args.set!r} cases", file=sys.stderr)
            return 2
    jobs = args.jobs or min(8, os.cpu_count() or 1)
    rows = measure_parallel(cases, args.arch, jobs)
    bad = judge(rows, int(args.limit_kib * KIB), int(args.margin_kib * KIB), args.max_spill, args.fail_on_spill)
    spilling = sum("SPILLS" in r.verdict for r in rows)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, arch=args.arch, rows=[asdict(r) for r in rows]), f, indent=1)
    tail = f" ({spilling} marked SPILLS: launchable, slow)" if spilling else ""
    print(f"{len(rows)} rows, {bad} over the limits{tail}" if bad else f"{len(rows)} rows, all within the limits{tail}")
    return 1 if bad else 0


if __name__ == "__main__":
    # through the package's module, not __main__: the worker processes unpickle its Case / Row / functions
    from hybridlab.kernels.bench.triton_resources import main as _main

    sys.exit(_main())
