"""CuTe DSL kernels for the one-token trapezoidal SSM step (imports cutlass: load lazily).

``cute.py`` is the public, import-safe face; this module is imported only when a
kernel is compiled. One CTA per (head, batch row); 128 threads (fewer for tiny
shapes). What a CTA does, in four stages separated by barriers:

  A. scalars: log α, β, γ (given, or from dt/A/λ of the in_proj row: fused; |A| through
     the heavy tail or softplus, with or without the per-head bias, as in ssm_io)
  B. k, q (R × d_state) into shared memory: given, or B/C RMSNorm + bias + rotary
     with the running phase (fused); the previous (k, v) read from the state, the
     new (k, v) written back to it; v = x ⊙ W_x (fused MIMO)
  C. the state update, h (P × N, fp32) streamed once through registers with
     16-byte loads/stores (the loads are issued first thing, before stage A, so the
     state is in flight while the latency-bound pre-processing runs): h = α h + β Σ_r v'_r k'_rᵀ + γ Σ_r v_r k_rᵀ, and
     y_r = h q_r reduced across the lanes that share a row
  D. output: y (contract), or the D skip, pre-gate grouped RMSNorm, SiLU gate and
     the rank combination (fused), one (H·P) row ready for out_proj

Every rounding the PyTorch layer performs in the model dtype (bf16/fp16) is
repeated here at the same point, so the fused step tracks the reference to the
last bit of most elements; fp32 state and accumulations as in the contract.
"""

from __future__ import annotations

import math
import operator

import cutlass
import cutlass.cute as cute
from cutlass import Float32

try:  # cutlass-dsl >= 4.8; utils.SmemAllocator is its deprecated alias
    from cutlass.memory import SmemAllocator
except ImportError:  # pragma: no cover
    from cutlass.utils import SmemAllocator

WARP = 32
VEC = 4  # fp32 elements per 16-byte access of the state


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class StepConfig:
    """Static description of one compiled step kernel (all fields are compile-time)."""

    def __init__(self, *, B, H, P, N, R, dtype, fused, n_angles=0, trapezoid=True, bc_norm=True, bc_bias=True,
                 mimo=False, out_norm=False, eps=1e-5, a_floor=1e-4, d_proj=0, offsets=None, heavy_tail=True,
                 a_bias=False):
        self.B, self.H, self.P, self.N, self.R = B, H, P, N, R
        self.dtype = dtype  # cutlass numeric type of q/k/v/in_proj/out
        self.fused = fused
        self.NA = n_angles
        self.trapezoid, self.bc_norm, self.bc_bias = trapezoid, bc_norm, bc_bias
        self.mimo, self.out_norm = mimo, out_norm
        self.eps, self.a_floor = float(eps), float(a_floor)
        self.heavy_tail, self.a_bias = bool(heavy_tail), bool(a_bias)
        self.d_proj = d_proj
        self.off = offsets or {}
        # thread layout of the state stage: TN lanes share a row of N, NV 16-byte vectors each
        n4 = N // VEC
        self.TN = min(WARP, n4)
        self.NV = n4 // self.TN
        self.RP = max(1, min(128 // self.TN, P))  # rows per pass
        self.NT = self.RP * self.TN
        self.NW = self.NT // WARP
        self.RPT = P // self.RP  # rows per thread
        # parameter pack offsets (fp32, see cute.py: pack_params)
        o = 0
        self.p_dt_bias = o; o += H
        self.p_a_bias = o; o += H
        self.p_D = o; o += H
        self.p_norm = o; o += 2 * N  # b_norm, c_norm
        self.p_bias = o; o += 2 * H * R * N  # b_bias, c_bias
        self.p_mx = o; o += H * R * P
        self.p_mz = o; o += H * R * P
        self.p_mo = o; o += H * R * P
        self.p_on = o; o += H * P
        self.p_len = o

    @staticmethod
    def supported(P: int, N: int, R: int) -> tuple[bool, str]:
        if N % WARP or not (_pow2(N // VEC) or (N // VEC) % WARP == 0):
            return False, f"d_state {N}: needs a multiple of 32 with d_state/4 a power of two or a multiple of 32"
        if P % WARP or not _pow2(P):
            return False, f"headdim {P}: needs a power of two >= 32"
        tn = min(WARP, N // VEC)
        rp = max(1, min(128 // tn, P))
        if (rp * tn) % WARP or P % rp:
            return False, f"headdim {P} x d_state {N}: too small for the thread layout"
        if R > 16:
            return False, f"rank {R} > 16"
        return True, ""

    def key(self):
        return tuple(sorted((k, v if not isinstance(v, dict) else tuple(sorted(v.items())))
                            for k, v in self.__dict__.items() if k != "dtype")) + (str(self.dtype),)


class SSMStep:
    """The step kernel for one StepConfig. Call with tensors (see cute.py for the views)."""

    def __init__(self, cfg: StepConfig):
        self.cfg = cfg

    # ----------------------------------------------------------------- helpers (trace-time)
    def rnd(self, x):
        """Round an fp32 value through the model dtype, as the PyTorch layer does."""
        if self.cfg.dtype is Float32:
            return x
        return x.to(self.cfg.dtype).to(Float32)

    @staticmethod
    def softplus(x):
        # log(1 + e^x), stable: max(x, 0) + log1p(e^{-|x|})
        return cute.math.max(x, Float32(0.0)) + cute.math.log1p(cute.math.exp(-cute.math.abs(x)))

    @staticmethod
    def heavy_tail(x):
        # 1 + x for x >= 0, 1 / (1 - x) below: max(x, 0) + 1 / (1 - min(x, 0)), branch-free
        return cute.math.max(x, Float32(0.0)) + Float32(1.0) / (Float32(1.0) - cute.math.min(x, Float32(0.0)))

    @staticmethod
    def sigmoid(x):
        return Float32(1.0) / (Float32(1.0) + cute.math.exp(-x))

    # ----------------------------------------------------------------- host side
    @cute.jit
    def __call__(
        self,
        mQ: cute.Tensor,  # (B*H*R, N)      contract: q     fused: unused
        mK: cute.Tensor,  # (B*H*R, N)      contract: k     fused: unused
        mV: cute.Tensor,  # (B*H*R, P)      contract: v     fused: unused
        mLA: cute.Tensor,  # (B*H,) fp32    contract: log α      fused: unused
        mBeta: cute.Tensor,  # (B*H,) fp32  contract: β
        mGamma: cute.Tensor,  # (B*H,) fp32 contract: γ
        mZX: cute.Tensor,  # (B, d_proj)    fused: the in_proj row
        mPar: cute.Tensor,  # (p_len,) fp32 fused: packed parameters
        mPhase: cute.Tensor,  # (B*H, max(NA,1)) fp32, in/out
        mH: cute.Tensor,  # (B*H*P, N) fp32, in/out
        mKs: cute.Tensor,  # (B*H*R, N), in/out
        mVs: cute.Tensor,  # (B*H*R, P), in/out
        mOut: cute.Tensor,  # contract: y (B*H*R, P)   fused: (B, H*P)
        stream,
    ):
        c = self.cfg
        self.kernel(mQ, mK, mV, mLA, mBeta, mGamma, mZX, mPar, mPhase, mH, mKs, mVs, mOut).launch(
            grid=[c.H, c.B, 1], block=[c.NT, 1, 1], stream=stream
        )

    # ----------------------------------------------------------------- device side
    @cute.kernel
    def kernel(
        self,
        mQ: cute.Tensor,
        mK: cute.Tensor,
        mV: cute.Tensor,
        mLA: cute.Tensor,
        mBeta: cute.Tensor,
        mGamma: cute.Tensor,
        mZX: cute.Tensor,
        mPar: cute.Tensor,
        mPhase: cute.Tensor,
        mH: cute.Tensor,
        mKs: cute.Tensor,
        mVs: cute.Tensor,
        mOut: cute.Tensor,
    ):
        c = self.cfg
        H, P, N, R, NA = c.H, c.P, c.N, c.R, c.NA
        NT, NW = c.NT, c.NW
        tidx, _, _ = cute.arch.thread_idx()
        head, bat, _ = cute.arch.block_idx()
        lane = tidx % WARP
        warp = tidx // WARP
        bh = bat * H + head

        smem = SmemAllocator()
        sPre = smem.allocate_tensor(Float32, cute.make_layout((2 * R, N), stride=(N, 1)), byte_alignment=16)
        sKQ = smem.allocate_tensor(Float32, cute.make_layout((2 * R, N), stride=(N, 1)), byte_alignment=16)
        sKp = smem.allocate_tensor(Float32, cute.make_layout((R, N), stride=(N, 1)), byte_alignment=16)
        sV = smem.allocate_tensor(Float32, cute.make_layout((R, P), stride=(P, 1)), byte_alignment=16)
        sVp = smem.allocate_tensor(Float32, cute.make_layout((R, P), stride=(P, 1)), byte_alignment=16)
        sY = smem.allocate_tensor(Float32, cute.make_layout((R, P), stride=(P, 1)), byte_alignment=16)
        sG = smem.allocate_tensor(Float32, cute.make_layout((R, P), stride=(P, 1)), byte_alignment=16)
        sCS = smem.allocate_tensor(Float32, cute.make_layout((2, max(NA, 1)), stride=(max(NA, 1), 1)), byte_alignment=16)

        # ---- prefetch: this thread's rows of h go in flight first and stay in registers, so the state
        # streams from HBM while the pre-processing below (latency-bound, behind barriers) runs
        TN, NV, RP, RPT = c.TN, c.NV, c.RP, c.RPT
        grp = tidx // TN
        gl = tidx % TN
        hfr = []
        for i in cutlass.range_constexpr(RPT):
            row = bh * P + grp + i * RP
            fr = []
            for jv in cutlass.range_constexpr(NV):
                t = cute.local_tile(mH, (1, VEC), (row, gl + jv * TN))
                f = cute.make_rmem_tensor(cute.make_layout((1, VEC)), Float32)
                cute.autovec_copy(t, f)
                fr.append((t, f))
            hfr.append(fr)

        # ---- A. scalars
        dt = Float32(0.0)
        if cutlass.const_expr(c.fused):
            off = c.off
            dt = self.softplus(mZX[bat, off["dt"] + head].to(Float32) + mPar[c.p_dt_bias + head])
            u_a = mZX[bat, off["a"] + head].to(Float32)
            if cutlass.const_expr(c.a_bias):
                u_a = u_a + mPar[c.p_a_bias + head]
            a_mag = Float32(0.0)
            if cutlass.const_expr(c.heavy_tail):
                a_mag = self.heavy_tail(u_a)
            else:
                a_mag = self.softplus(u_a)
            A = -cute.math.max(a_mag, Float32(c.a_floor))
            la = A * dt
            if cutlass.const_expr(c.trapezoid):
                lam = self.sigmoid(mZX[bat, off["lam"] + head].to(Float32))
                beta = (Float32(1.0) - lam) * dt * cute.math.exp(la)
                gamma = lam * dt
            else:
                beta = Float32(0.0)
                gamma = dt
        else:
            la = mLA[bh]
            beta = mBeta[bh]
            gamma = mGamma[bh]
        alpha = cute.math.exp(la)

        # ---- B0. previous (k, v) from the state (before anything overwrites it)
        for i in cutlass.range_constexpr((R * N + NT - 1) // NT):
            idx = tidx + i * NT
            if idx < R * N:
                sKp[idx // N, idx % N] = mKs[bh * R + idx // N, idx % N].to(Float32)

        # ---- B1. k, q rows into sPre (fused: RMSNorm + bias) or straight into sKQ (contract)
        if cutlass.const_expr(c.fused):
            off = c.off
            for i in cutlass.range_constexpr((2 * R + NW - 1) // NW):
                j = warp + i * NW  # rows 0..R-1: B (-> k); R..2R-1: C (-> q); C follows B in in_proj
                if j < 2 * R:
                    xs = [mZX[bat, off["B"] + j * N + lane + cc * WARP].to(Float32) for cc in range(N // WARP)]
                    scale = Float32(1.0)
                    if cutlass.const_expr(c.bc_norm):
                        ss = Float32(0.0)
                        for cc in cutlass.range_constexpr(N // WARP):
                            ss = ss + xs[cc] * xs[cc]
                        ss = cute.arch.warp_reduction(ss, operator.add, threads_in_group=WARP)
                        scale = cute.math.rsqrt(ss / Float32(N) + Float32(c.eps))
                    for cc in cutlass.range_constexpr(N // WARP):
                        n = lane + cc * WARP
                        val = xs[cc]
                        if cutlass.const_expr(c.bc_norm):
                            val = self.rnd(val * scale * mPar[c.p_norm + (j // R) * N + n])
                        if cutlass.const_expr(c.bc_bias):
                            val = self.rnd(val + mPar[c.p_bias + (j // R) * (H * R * N) + head * (R * N) + (j % R) * N + n])
                        sPre[j, n] = val
            if cutlass.const_expr(NA > 0):
                # the running phase: φ += θ dt; cos/sin once per angle (read back after the barrier)
                for i in cutlass.range_constexpr((NA + NT - 1) // NT):
                    a = tidx + i * NT
                    if a < NA:
                        theta = Float32(math.pi) * cute.math.tanh(mZX[bat, off["th"] + a].to(Float32))
                        ang = theta * dt + mPhase[bh, a]
                        sCS[0, a] = cute.math.cos(ang)
                        sCS[1, a] = cute.math.sin(ang)
                        mPhase[bh, a] = ang
        else:
            for i in cutlass.range_constexpr((R * N + NT - 1) // NT):
                idx = tidx + i * NT
                if idx < R * N:
                    sKQ[idx // N, idx % N] = mK[bh * R + idx // N, idx % N].to(Float32)
                    sKQ[R + idx // N, idx % N] = mQ[bh * R + idx // N, idx % N].to(Float32)
        # v (and the previous v) into shared memory; the new v into the state
        for i in cutlass.range_constexpr((R * P + NT - 1) // NT):
            idx = tidx + i * NT
            if idx < R * P:
                r = idx // P
                p = idx % P
                vnew = Float32(0.0)
                if cutlass.const_expr(c.fused):
                    vnew = mZX[bat, c.off["x"] + head * P + p].to(Float32)
                    if cutlass.const_expr(c.mimo):
                        vnew = self.rnd(vnew * mPar[c.p_mx + (head * R + r) * P + p])
                else:
                    vnew = mV[bh * R + r, p].to(Float32)
                sVp[r, p] = mVs[bh * R + r, p].to(Float32)
                sV[r, p] = vnew
                mVs[bh * R + r, p] = vnew.to(mVs.element_type)
        cute.arch.barrier()

        # ---- B2. rotary with the running phase (fused); new k into the state
        if cutlass.const_expr(c.fused):
            for i in cutlass.range_constexpr((2 * R * N + NT - 1) // NT):
                idx = tidx + i * NT
                if idx < 2 * R * N:
                    j = idx // N
                    n = idx % N
                    val = sPre[j, n]
                    if cutlass.const_expr(NA > 0):
                        if n < 2 * NA:
                            a = n % NA
                            cs = sCS[0, a]
                            sn = sCS[1, a]
                            if n < NA:
                                val = self.rnd(sPre[j, n] * cs - sPre[j, n + NA] * sn)
                            else:
                                val = self.rnd(sPre[j, n - NA] * sn + sPre[j, n] * cs)
                    sKQ[j, n] = val
                    if j < R:
                        mKs[bh * R + j, n] = val.to(mKs.element_type)
        else:
            for i in cutlass.range_constexpr((R * N + NT - 1) // NT):
                idx = tidx + i * NT
                if idx < R * N:
                    mKs[bh * R + idx // N, idx % N] = mK[bh * R + idx // N, idx % N]
        cute.arch.barrier()

        # ---- C. the state update and y = h q
        kk, qq, kp = [], [], []
        for r in cutlass.range_constexpr(R):
            kr, qr, pr = [], [], []
            for jv in cutlass.range_constexpr(NV):
                for e in cutlass.range_constexpr(VEC):
                    n = (gl + jv * TN) * VEC + e
                    kr.append(sKQ[r, n])
                    qr.append(sKQ[R + r, n])
                    pr.append(sKp[r, n])
            kk.append(kr)
            qq.append(qr)
            kp.append(pr)
        for i in cutlass.range_constexpr(RPT):
            p = grp + i * RP
            vv = [sV[r, p] for r in range(R)]
            vp = [sVp[r, p] for r in range(R)]
            frags = hfr[i]
            ys = [Float32(0.0) for _ in range(R)]
            for jv in cutlass.range_constexpr(NV):
                t, f = frags[jv]
                for e in cutlass.range_constexpr(VEC):
                    m = jv * VEC + e
                    prev = vp[0] * kp[0][m]
                    cur = vv[0] * kk[0][m]
                    for r in cutlass.range_constexpr(1, R):
                        prev = prev + vp[r] * kp[r][m]
                        cur = cur + vv[r] * kk[r][m]
                    hn = alpha * f[0, e] + beta * prev + gamma * cur
                    f[0, e] = hn
                    for r in cutlass.range_constexpr(R):
                        ys[r] = ys[r] + hn * qq[r][m]
                cute.autovec_copy(f, t)
            for r in cutlass.range_constexpr(R):
                yr = cute.arch.warp_reduction(ys[r], operator.add, threads_in_group=TN)
                sY[r, p] = yr  # every lane of the group holds the sum: same value, same address
        cute.arch.barrier()

        # ---- D. output
        if cutlass.const_expr(not c.fused):
            for i in cutlass.range_constexpr((R * P + NT - 1) // NT):
                idx = tidx + i * NT
                if idx < R * P:
                    mOut[bh * R + idx // P, idx % P] = sY[idx // P, idx % P].to(mOut.element_type)
        else:
            Dh = mPar[c.p_D + head]
            for i in cutlass.range_constexpr((R + NW - 1) // NW):
                r = warp + i * NW
                if r < R:
                    ts = []
                    for cc in cutlass.range_constexpr(P // WARP):
                        p = lane + cc * WARP
                        y = self.rnd(sY[r, p])
                        ts.append(self.rnd(y + self.rnd(Dh * sV[r, p])))
                    if cutlass.const_expr(c.out_norm):
                        ss = Float32(0.0)
                        for cc in cutlass.range_constexpr(P // WARP):
                            ss = ss + ts[cc] * ts[cc]
                        ss = cute.arch.warp_reduction(ss, operator.add, threads_in_group=WARP)
                        sc = cute.math.rsqrt(ss / Float32(P) + Float32(c.eps))
                        for cc in cutlass.range_constexpr(P // WARP):
                            p = lane + cc * WARP
                            ts[cc] = self.rnd(self.rnd(ts[cc] * sc) * mPar[c.p_on + head * P + p])
                    for cc in cutlass.range_constexpr(P // WARP):
                        p = lane + cc * WARP
                        z = mZX[bat, c.off["z"] + head * P + p].to(Float32)
                        if cutlass.const_expr(c.mimo):
                            z = self.rnd(z * mPar[c.p_mz + (head * R + r) * P + p])
                        g = self.rnd(z * self.sigmoid(z))
                        o = self.rnd(ts[cc] * g)
                        if cutlass.const_expr(c.mimo):
                            sG[r, p] = self.rnd(o * mPar[c.p_mo + (head * R + r) * P + p])
                        else:
                            mOut[bat, head * P + p] = o.to(mOut.element_type)
            if cutlass.const_expr(c.mimo):
                cute.arch.barrier()
                for i in cutlass.range_constexpr((P + NT - 1) // NT):
                    p = tidx + i * NT
                    if p < P:
                        acc = sG[0, p]
                        for r in cutlass.range_constexpr(1, R):
                            acc = acc + sG[r, p]
                        mOut[bat, head * P + p] = acc.to(mOut.element_type)
