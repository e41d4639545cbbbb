"""HybridLM: embedding, pre-norm residual sub-blocks from the spec's layout, final norm, (tied) head.

Every layout token is one sub-block ``x = x + mixer(norm(x))``. Decoding keeps a
per-layer cache (Mamba-3: scan state + last (k, v) + running phase; attention:
KV cache) so that token-by-token generation equals the full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from hybridlab.kernels.cross_entropy import linear_cross_entropy

from .layers.attention import Attention, KVCache
from .layers.mamba3 import Mamba3, Mamba3Cache
from .layers.mlp import SwiGLU
from .layers.norm import RMSNorm
from .spec import AttentionBlock, Mamba3Block, ModelSpec, SwiGLUBlock


def build_mixer(d_model: int, blk, backends: dict, eps: float) -> nn.Module:
    if isinstance(blk, Mamba3Block):
        return Mamba3(d_model, blk, backend=backends.get("ssm", "auto"), norm_eps=eps)
    if isinstance(blk, AttentionBlock):
        return Attention(d_model, blk, backend=backends.get("attention", "auto"))
    if isinstance(blk, SwiGLUBlock):
        return SwiGLU(d_model, blk.resolved_hidden(d_model))
    raise TypeError(f"unknown block {blk!r}")


class SubBlock(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer

    def forward(self, x, cache=None, seq_idx=None):
        # an fp32 residual (residual_in_fp32) under 16-bit weights: the mixer sees the norm in the weights' dtype
        h = _like_weights(self.norm(x), self.norm.weight)
        if seq_idx is None:
            return x + self.mixer(h, cache)
        return x + self.mixer(h, cache, seq_idx=seq_idx)


def _like_weights(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return h if h.dtype == w.dtype else h.to(w.dtype)


@dataclass
class ModelCache:
    """Per-layer decode caches plus the batch's bookkeeping.

    ``pad`` (b,) long: left-padding per row (rows of different prompt lengths are
    right-aligned; see ``HybridLM.generate``); ``pad_max`` its largest value.
    ``pos`` (1,) long on the device: set by ``make_static`` for shape-static
    one-token steps (CUDA graphs); the attention layers share it.
    """

    layers: list  # one per sub-block (None for stateless mixers)
    seqlen: int = 0
    max_len: int = 0
    pad: Optional[torch.Tensor] = None
    pad_max: int = 0
    pos: Optional[torch.Tensor] = None

    def make_static(self) -> "ModelCache":
        """Give one-token steps fixed shapes and a device-side position (for CUDA graph capture)."""
        if self.pos is None:
            dev = next(t for c in self.layers if c is not None for t in _tensors(c)).device
            self.pos = torch.full((1,), self.seqlen, dtype=torch.long, device=dev)
            for c in self.layers:
                if isinstance(c, KVCache):
                    c.make_static(self.pos)
        return self


def _tensors(c):
    if isinstance(c, KVCache):
        return [c.k]
    return [c.scan.h]


class HybridLM(nn.Module):
    def __init__(self, spec: ModelSpec, backends: dict | None = None):
        """``backends``: optional {"ssm": ..., "attention": ...} overrides of the auto dispatch."""
        super().__init__()
        self.spec = spec
        backends = backends or {}
        d = spec.d_model
        self.embed = nn.Embedding(spec.vocab_size, d)
        self.layers = nn.ModuleList(SubBlock(d, build_mixer(d, blk, backends, spec.norm_eps), spec.norm_eps) for blk in spec.layer_blocks())
        self.norm_f = RMSNorm(d, spec.norm_eps)
        self.lm_head = nn.Linear(d, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for matrices; output projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
        std = self.spec.init_std
        out_std = std / math.sqrt(2 * len(self.layers))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, out_std if getattr(m, "is_output_proj", False) else std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)

    # the step of a training job asks the model for its loss (``targets=``) instead of its logits
    computes_loss = True

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None, seq_idx: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, return_hidden: bool = False,
                scored_at: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (b, l) -> logits (b, l, vocab). With ``cache``, continues from its position.

        ``seq_idx`` (b, l) int, nondecreasing per row: packed documents. Every mixer sees each
        document alone (Mamba-3 resets its state, phase and previous-token term; attention masks
        block-diagonally and counts positions per document), so the logits of a document are
        those it gets when run by itself.

        ``targets`` (b, l) int: return the mean cross-entropy over the scored tokens (``-100``
        is not scored) instead of the logits, through the chunked LM-head + cross-entropy op
        (``kernels.linear_cross_entropy``), so the (tokens x vocab) fp32 logits never exist.
        ``scored_at`` (b, k) int64, with ``targets``: positions that hold every scored token of each row
        (others may be among them, unscored): only these go through the LM head. A task that scores a
        few tokens a row (MQAR's answers, an arithmetic result) then skips the head's matmuls and
        cross-entropy over the rest, which at a large vocabulary is most of a small model's step.
        ``return_hidden``: return the final normed hidden states (b, l, d) instead of logits."""
        if targets is not None:
            if cache is not None or return_hidden:
                raise ValueError("HybridLM: targets= is for training (no cache, no return_hidden)")
            fn = self._compiled_loss if self._compiled_loss is not None else self._loss
            return fn(tokens, targets, seq_idx, scored_at)
        if scored_at is not None:
            raise ValueError("HybridLM: scored_at= goes with targets= (it picks the scored positions)")
        h = self._hidden(tokens, cache, seq_idx)
        return h if return_hidden else self.lm_head(h)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy of the next-token logits against ``targets`` (``-100``: not scored)."""
        return self(tokens, seq_idx=seq_idx, targets=targets)

    def _loss(self, tokens, targets, seq_idx, scored_at=None):
        if tuple(targets.shape) != tuple(tokens.shape):
            raise ValueError(f"HybridLM: targets must be shaped like tokens {tuple(tokens.shape)}; got {tuple(targets.shape)}")
        h = self._hidden(tokens, None, seq_idx)
        if scored_at is not None:
            if scored_at.dim() != 2 or scored_at.shape[0] != tokens.shape[0]:
                raise ValueError(f"HybridLM: scored_at must be (batch, k) positions; got {tuple(scored_at.shape)}")
            h = h.gather(1, scored_at.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            targets = targets.gather(1, scored_at)
        # lm_head.weight IS embed.weight when the embeddings are tied: one parameter, one gradient
        return linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=-100)

    _compiled_loss = None  # set by compile_training

    def compile_training(self, **compile_kwargs) -> None:
        """Run the training path (``forward(..., targets=)``) through ``torch.compile(**compile_kwargs)``;
        logits, scoring and generation stay eager (their shapes and caches vary: no recompiles there)."""
        self._compiled_loss = torch.compile(self._loss, **compile_kwargs)

    def _hidden(self, tokens: torch.Tensor, cache: ModelCache | None, seq_idx: torch.Tensor | None) -> torch.Tensor:
        if seq_idx is not None:
            if cache is not None:
                raise ValueError("HybridLM: packed documents (seq_idx) are for training and scoring, not cached decoding")
            if tuple(seq_idx.shape) != tuple(tokens.shape):
                raise ValueError(f"HybridLM: seq_idx must be shaped like tokens {tuple(tokens.shape)}; got {tuple(seq_idx.shape)}")
            seq_idx = seq_idx.to(device=tokens.device, dtype=torch.int32)
        x = self.embed(tokens)
        if self.spec.residual_in_fp32 and x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        l = tokens.shape[1]
        if cache is not None:
            valid = None
            if cache.pad is not None and cache.seqlen < cache.pad_max:  # left padding inside this chunk
                t = torch.arange(cache.seqlen, cache.seqlen + l, device=tokens.device)
                valid = t[None, :] >= cache.pad[:, None]
            for c in cache.layers:
                if isinstance(c, Mamba3Cache):
                    c.valid = valid
        for i, layer in enumerate(self.layers):
            if seq_idx is None:
                x = layer(x, cache.layers[i] if cache is not None else None)
            else:
                x = layer(x, None, seq_idx=seq_idx)
        if cache is not None:
            cache.seqlen += l
            if cache.pos is not None:
                cache.pos += l
        return _like_weights(self.norm_f(x), self.norm_f.weight)

    def allocate_cache(self, batch: int, max_len: int, device=None, dtype=None, pad: torch.Tensor | None = None) -> ModelCache:
        """Caches for ``batch`` rows of up to ``max_len`` positions; ``pad`` (b,): left-padding per row."""
        p = self.embed.weight
        device, dtype = device or p.device, dtype or p.dtype
        caches = [
            layer.mixer.allocate_cache(batch, max_len, device, dtype) if hasattr(layer.mixer, "allocate_cache") else None
            for layer in self.layers
        ]
        pad_max = 0
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=device)
            pad_max = int(pad.max()) if pad.numel() else 0
            if pad_max == 0:
                pad = None
            for c in caches:
                if isinstance(c, KVCache):
                    c.pad = pad
        return ModelCache(caches, 0, max_len, pad, pad_max)

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[torch.Tensor, Sequence[Sequence[int]]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        prompt_lengths: torch.Tensor | Sequence[int] | None = None,
        cuda_graph: bool | None = None,
        pad_id: int = 0,
    ) -> torch.Tensor:
        """Prefill the prompt in one pass, then decode one token at a time.

        ``prompt``: (b, l) tokens, or a list of token lists of different lengths.
        Rows of different lengths are left-padded (right-aligned): with a tensor,
        ``prompt_lengths[i]`` says that row i's prompt is its last
        ``prompt_lengths[i]`` columns (a list is padded with ``pad_id`` for you).
        Padded positions are invisible to every layer (attention masks them as
        keys; Mamba-3 skips them with dt = 0), so each row generates what it would
        alone. temperature 0 is greedy. Returns (b, l + max_new_tokens), padding kept.

        On CUDA the decode loop runs as a captured CUDA graph over static caches
        (``cuda_graph=False`` to run it eagerly); on the CPU it runs eagerly.
        """
        prompt, pad = _pad_prompts(prompt, prompt_lengths, pad_id, self.embed.weight.device)
        if max_new_tokens <= 0:
            return prompt
        use_graph = prompt.is_cuda if cuda_graph is None else cuda_graph
        if use_graph and not prompt.is_cuda:
            raise ValueError("generate: cuda_graph=True needs the model on CUDA")
        from .decode import Decoder

        dec = Decoder(self, prompt.shape[0], prompt.shape[1] + max_new_tokens, pad=pad, cuda_graph=use_graph)
        logits = dec.prefill(prompt)
        out = [prompt]
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p, generator)
            out.append(tok[:, None])
            if i + 1 < max_new_tokens:
                logits = dec.step(tok)
        return torch.cat(out, dim=1)


def _pad_prompts(prompt, lengths, pad_id: int, device):
    """(tokens (b, l) on device, left-padding per row (b,) or None)."""
    if not isinstance(prompt, torch.Tensor):
        rows = [list(r) for r in prompt]
        if not rows or min(len(r) for r in rows) < 1:
            raise ValueError("generate: every prompt needs at least one token")
        width = max(len(r) for r in rows)
        prompt = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
        lengths = [len(r) for r in rows]
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must be (batch, length >= 1), got {tuple(prompt.shape)}")
    prompt = prompt.to(device)
    if lengths is None:
        return prompt, None
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if lengths.shape != (prompt.shape[0],) or int(lengths.min()) < 1 or int(lengths.max()) > prompt.shape[1]:
        raise ValueError(f"generate: prompt_lengths must be ({prompt.shape[0]},) with values in 1..{prompt.shape[1]}")
    pad = prompt.shape[1] - lengths
    return prompt, (pad.to(device) if int(pad.max()) > 0 else None)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, generator=None):
    """Greedy at temperature 0; otherwise softmax sampling with optional top-k / nucleus filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
