"""Decoding: prefill, then one-token steps over static caches; on CUDA the step is a CUDA graph.

    dec = Decoder(model, batch, max_len, pad=None, cuda_graph=True)
    logits = dec.prefill(prompt)        # (b, vocab): chunked scan / full attention, state handed to the caches
    logits = dec.step(tokens)           # (b,) -> (b, vocab), one position further

Prefill runs eagerly (any length). On CUDA the caches are made shape-static
(device-side position, attention over the whole KV buffer with a mask, Mamba-3
state updated in place), so the step can be captured once and replayed: the
first step runs eagerly on a side stream (it compiles the CuTe kernels and warms
cuBLAS), the second is captured and every later one replays the graph. The
graph's input is a fixed token buffer and its output a fixed logits buffer
(overwritten by the next step: sample from it before stepping again).
Sampling stays outside the graph, so any ``torch.Generator`` works.
"""

from __future__ import annotations

import torch

from .layers.attention import KVCache


class Decoder:
    def __init__(self, model, batch: int, max_len: int, pad: torch.Tensor | None = None, cuda_graph: bool = False,
                 static: bool | None = None):
        self.model = model
        self.cache = model.allocate_cache(batch, max_len, pad=pad)
        dev = model.embed.weight.device
        self.static = (dev.type == "cuda") if static is None else static
        self.cuda_graph = cuda_graph
        if cuda_graph and dev.type != "cuda":
            raise ValueError("Decoder: cuda_graph needs the model on CUDA")
        if self.static or cuda_graph:
            self.cache.make_static()
        self.graph: torch.cuda.CUDAGraph | None = None
        self._steps = 0
        self._tok = None
        self._logits = None

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run the prompt (b, l) through the model, filling the caches; returns the last position's logits."""
        self._check_room(tokens.shape[1])
        return self.model(tokens, self.cache)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (b,) -> logits (b, vocab) for the next position."""
        self._check_room(1)
        tokens = tokens.reshape(-1, 1)
        if not self.cuda_graph:
            return self.model(tokens, self.cache)[:, -1]
        if self.graph is None:
            if self._steps == 0:  # warm-up step: eager, on a side stream, for real
                self._steps += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    logits = self.model(tokens, self.cache)[:, -1]
                torch.cuda.current_stream().wait_stream(side)
                return logits
            self._capture(tokens)
        self._tok.copy_(tokens)
        self.graph.replay()
        self._advance_host(1)
        self._steps += 1
        return self._logits

    def seek(self, position: int) -> None:
        """Pretend ``position`` tokens are cached (benchmarks: decode at a given context without a prefill)."""
        c = self.cache
        c.seqlen = position
        for lc in c.layers:
            if isinstance(lc, KVCache):
                lc.length = position
                lc.reset_bias(position)
        if c.pos is not None:
            c.pos.fill_(position)

    # ------------------------------------------------------------------ internals
    def _check_room(self, n: int) -> None:
        if self.cache.seqlen + n > self.cache.max_len:
            raise ValueError(f"Decoder: cache holds {self.cache.max_len} positions; {self.cache.seqlen + n} needed")

    def _host_counters(self):
        return self.cache.seqlen, [lc.length for lc in self.cache.layers if isinstance(lc, KVCache)]

    def _set_host_counters(self, saved) -> None:
        self.cache.seqlen, lengths = saved[0], list(saved[1])
        for lc in self.cache.layers:
            if isinstance(lc, KVCache):
                lc.length = lengths.pop(0)

    def _advance_host(self, n: int) -> None:
        self.cache.seqlen += n
        for lc in self.cache.layers:
            if isinstance(lc, KVCache):
                lc.length += n

    def _capture(self, tokens: torch.Tensor) -> None:
        self._tok = tokens.clone()
        saved = self._host_counters()  # capture runs the Python once without executing: undo its bookkeeping
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            self._logits = self.model(self._tok, self.cache)[:, -1]
        self._set_host_counters(saved)
        self.graph = g
