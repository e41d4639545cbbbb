"""Parameters, FLOPs per token and cache bytes of a spec — computed from the spec alone.

No model is built, so ``check`` is instant even for 1.5B specs; the test suite
checks ``count_params`` against a real ``HybridLM`` so the two cannot drift.

FLOP conventions (multiply-add = 2 FLOPs, training = 3 × forward):
* matmuls: 2 × weight elements per token (the tied head counts once).
* causal attention at training length L: 4·heads·head_dim·L/2 per token forward
  (QKᵀ and PV over the average L/2 keys); decode at context L: 4·heads·head_dim·L.
* Mamba-3 scan, chunk C (the kernels' default: 64 / R): forward per token per head 2R²C(N+P) (the intra-chunk
  matmuls over 2R key/value columns, causal half) + 6RPN (state in, out and
  update); decode per head (6R+1)·P·N (two outer products, the decay, the read).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridlab.kernels import default_chunk_size

from .spec import AttentionBlock, Mamba3Block, ModelSpec, SwiGLUBlock

CACHE_BYTES = 2  # bf16 k/v caches; SSM state h and the phase are fp32


@dataclass
class BlockCount:
    params: int
    matmul_params: int  # weights of the linear maps (for the 2·W FLOP rule)
    fwd_flops_extra: float  # sequence-mixing FLOPs per token at training length, forward
    decode_flops_extra: float  # sequence-mixing FLOPs per token at the decode context
    state_bytes: int  # per sequence at the given length


def mamba3_dims(d_model: int, b: Mamba3Block) -> dict:
    E, H, P, N, R = b.d_inner(d_model), b.heads(d_model), b.headdim, b.d_state, b.rank
    return dict(E=E, H=H, P=P, N=N, R=R, A=b.rope_dims // 2, C=b.chunk_size or default_chunk_size(R))


def count_block(d_model: int, b, seq_len: int) -> BlockCount:
    D = d_model
    if isinstance(b, Mamba3Block):
        m = mamba3_dims(D, b)
        E, H, P, N, R, A, C = (m[k] for k in "EHPNRAC")
        proj_out = 2 * E + 2 * R * N + 2 * H + (H if b.trapezoid else 0) + (A if b.rope is True else 0)  # θ: data-dependent only
        matmul = D * proj_out + E * D
        extra = 2 * H + (H if b.a_bias else 0)  # dt_bias, D (, a_bias)
        extra += 2 * N if b.bc_norm else 0
        extra += 2 * H * R * N if b.bc_bias else 0
        extra += 3 * H * R * P if b.mode == "mimo" else 0
        extra += H * P if b.out_norm == "pre_gate_grouped" else 0
        chunk = min(C, seq_len)
        fwd = H * (2 * R * R * chunk * (N + P) + 6 * R * P * N)
        dec = H * (6 * R + 1) * P * N
        state = H * P * N * 4 + H * R * (N + P) * CACHE_BYTES + H * A * 4
        if b.d_conv:  # the short convolution over x, B, C: a weight per channel and tap, a bias per channel
            ch = E + 2 * R * N
            extra += ch * (b.d_conv + 1)
            fwd, dec = fwd + 2 * ch * b.d_conv, dec + 2 * ch * b.d_conv
            state += (b.d_conv - 1) * ch * CACHE_BYTES
        return BlockCount(matmul + extra, matmul, fwd, dec, state)
    if isinstance(b, AttentionBlock):
        hd, kvh = b.resolved_head_dim(D), b.resolved_kv_heads()
        matmul = D * b.heads * hd + D * 2 * kvh * hd + b.heads * hd * D
        biases = ((b.heads + 2 * kvh) * hd if b.qkv_bias else 0) + (D if b.out_bias else 0)
        fwd = 4 * b.heads * hd * seq_len / 2
        dec = 4 * b.heads * hd * seq_len
        state = 2 * seq_len * kvh * hd * CACHE_BYTES
        return BlockCount(matmul + biases, matmul, fwd, dec, state)
    if isinstance(b, SwiGLUBlock):
        matmul = 3 * D * b.resolved_hidden(D)
        return BlockCount(matmul, matmul, 0, 0, 0)
    raise TypeError(b)


def count_spec(spec: ModelSpec, seq_len: int = 2048) -> dict:
    """Totals for the whole model: params (total, by mixer, embedding), FLOPs/token, cache bytes."""
    D, V = spec.d_model, spec.vocab_size
    per_layer = [count_block(D, b, seq_len) for b in spec.layer_blocks()]
    by_mixer: dict[str, int] = {}
    for b, c in zip(spec.layer_blocks(), per_layer):
        by_mixer[b.mixer] = by_mixer.get(b.mixer, 0) + c.params
    norms = D * (len(per_layer) + 1)
    embed = V * D
    head = 0 if spec.tie_embeddings else V * D
    params = embed + head + norms + sum(c.params for c in per_layer)
    matmul = sum(c.matmul_params for c in per_layer) + V * D  # the head runs on every token
    fwd = 2 * matmul + sum(c.fwd_flops_extra for c in per_layer)
    decode = 2 * matmul + sum(c.decode_flops_extra for c in per_layer)
    return {
        "params": params,
        "params_by_mixer": by_mixer,
        "params_embedding": embed + head,
        "params_norms": norms,
        "layer_params": [c.params for c in per_layer],
        "flops_per_token_train": 3 * fwd,
        "flops_per_token_fwd": fwd,
        "flops_per_token_decode": decode,
        "state_bytes": sum(c.state_bytes for c in per_layer),
        "layer_state_bytes": [c.state_bytes for c in per_layer],
        "seq_len": seq_len,
    }


def count_params(spec: ModelSpec) -> int:
    return count_spec(spec, 1)["params"]
