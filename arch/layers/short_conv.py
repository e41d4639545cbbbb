"""Mamba-2's short causal convolution: depthwise over the channels, a few tokens wide, then SiLU.

    y, window = causal_conv(x, weight, bias, window=None, seq_idx=None)

x (b, l, c); weight (c, k) with tap k-1 on the current token and tap k-1-j on the token j back (nn.Conv1d's
order, so a Mamba-2 ``conv1d.weight`` (c, 1, k) is ``weight[:, 0]``); bias (c,). ``window`` (b, k-1, c): the
k-1 inputs before x (a decode cache's; None: zeros, the start of a sequence); the returned window is the
last k-1 inputs, for the next call, so a prefill then one-token steps equal one pass over the whole sequence.
``seq_idx`` (b, l) int (packed documents): a tap never reaches into another document (the window belongs
to the first document).

It is written as k shifted multiply-adds instead of ``F.conv1d``: the document mask needs the taps one by
one, k is small (Mamba-2: 4), and under torch.compile the sum is one fused elementwise kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], window: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    b, l, c = x.shape
    k = weight.shape[1]
    if window is None:
        window = x.new_zeros(b, k - 1, c)
    full = torch.cat([window.to(x.dtype), x], dim=1)  # (b, k-1+l, c): position t of x is k-1+t
    docs = None
    if seq_idx is not None:
        docs = torch.cat([seq_idx[:, :1].expand(b, k - 1), seq_idx], dim=1)
    w = weight.to(x.dtype)
    out = x * w[:, k - 1]
    for j in range(1, k):  # the token j back
        prev = full[:, k - 1 - j:k - 1 - j + l]
        if docs is not None:
            prev = prev * (docs[:, k - 1 - j:k - 1 - j + l] == seq_idx)[..., None].to(x.dtype)
        out = out + prev * w[:, k - 1 - j]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return F.silu(out), full[:, l:]


def causal_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One sequence per row, no window: nn.Conv1d's padded convolution cut to the causal part, then SiLU."""
    k = weight.shape[1]
    y = F.conv1d(x.transpose(1, 2), weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=k - 1, groups=x.shape[2])
    return F.silu(y[..., :x.shape[1]].transpose(1, 2))
