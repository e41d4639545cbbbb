"""HybridLM: embedding, pre-norm residual sub-blocks from the spec's layout, final norm, (tied) head.

Every layout token is one sub-block ``x = x + mixer(norm(x))``. Decoding keeps a
per-layer cache (Mamba-3: scan state + last (k, v) + running phase; attention:
KV cache) so that token-by-token generation equals the full forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers.attention import Attention
from .layers.mamba3 import Mamba3
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

    def forward(self, x, cache=None):
        return x + self.mixer(self.norm(x), cache)


@dataclass
class ModelCache:
    layers: list  # one per sub-block (None for stateless mixers)
    seqlen: int = 0
    max_len: int = 0


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

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None) -> torch.Tensor:
        """tokens (b, l) -> logits (b, l, vocab). With ``cache``, continues from its position."""
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache.layers[i] if cache is not None else None)
        if cache is not None:
            cache.seqlen += tokens.shape[1]
        return self.lm_head(self.norm_f(x))

    def allocate_cache(self, batch: int, max_len: int, device=None, dtype=None) -> ModelCache:
        p = self.embed.weight
        device, dtype = device or p.device, dtype or p.dtype
        caches = [
            layer.mixer.allocate_cache(batch, max_len, device, dtype) if hasattr(layer.mixer, "allocate_cache") else None
            for layer in self.layers
        ]
        return ModelCache(caches, 0, max_len)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prefill the prompt (b, l) in one pass, then decode one token at a time.

        temperature 0 is greedy. Returns (b, l + max_new_tokens).
        """
        if prompt.dim() != 2 or prompt.shape[1] < 1:
            raise ValueError(f"generate: prompt must be (batch, length >= 1), got {tuple(prompt.shape)}")
        cache = self.allocate_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
        logits = self(prompt, cache)[:, -1]
        out = [prompt]
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p, generator)
            out.append(tok[:, None])
            if i + 1 < max_new_tokens:
                logits = self(tok[:, None], cache)[:, -1]
        return torch.cat(out, dim=1)


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
