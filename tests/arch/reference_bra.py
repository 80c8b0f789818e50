"""Independent references for BiFormer's token mixers, written from the released semantics (rayleizhu/BiFormer,
ops/bra_legacy.py and models/_common.py), on raster-order tokens with a dense "query i may see key j" mask:
no regions-as-blocks layout, no block-sparse core, routing by explicit per-region sums.

Padding (maps not divisible by n_win) follows our documented departure: regions are the ceil(H/n)×ceil(W/n)
cells of the padded grid, region means are over real tokens, a region without real tokens is never routed,
and only real tokens exist as keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def region_ids(H: int, W: int, n: int) -> torch.Tensor:
    """[H·W] region of each token (raster order), regions numbered row-major over the n×n grid."""
    rh, rw = math.ceil(H / n), math.ceil(W / n)
    rows = torch.arange(H)[:, None] // rh
    cols = torch.arange(W)[None, :] // rw
    return (rows * n + cols).flatten()


def routed_mask(q: torch.Tensor, k: torch.Tensor, reg: torch.Tensor, n_regions: int, topk: int) -> torch.Tensor:
    """q, k [B, T, C] (raster order), reg [T] -> mask [B, T, T]: query i sees key j iff j's region is among the
    top-k key regions of i's region by (mean q of the region) · (mean k of the region), over non-empty regions."""
    B, T, C = q.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    present = sorted(set(reg.tolist()))  # regions holding at least one token
    for b in range(B):
        q_mean = {r: q[b, reg == r].mean(0) for r in present}
        k_mean = {r: k[b, reg == r].mean(0) for r in present}
        for r in present:
            scores = sorted(present, key=lambda s: -float(q_mean[r] @ k_mean[s]))
            chosen = torch.tensor(scores[:topk])
            mask[b, reg == r] = torch.isin(reg, chosen)[None, :]
    return mask


def reference_bra(
    x: torch.Tensor,
    w_qkv: torch.Tensor,
    b_qkv: torch.Tensor | None,
    w_lce: torch.Tensor,
    b_lce: torch.Tensor,
    w_o: torch.Tensor,
    b_o: torch.Tensor,
    *,
    n_win: int,
    topk: int | str,
    n_heads: int,
    scale: float,
    lce_on: str = "v",
) -> torch.Tensor:
    """Bi-level routing attention (``topk`` int) or full attention (``topk="all"``) + LCE/LePE (depthwise conv on
    V or on x), then the output projection. x [B, H, W, C] -> [B, H, W, C]."""
    B, H, W, C = x.shape
    T, hd = H * W, C // n_heads
    qkv = F.linear(x.reshape(B, T, C), w_qkv, b_qkv)  # [B, T, 3C]
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    if topk == "all":
        mask = torch.ones(B, T, T, dtype=torch.bool)
    else:
        mask = routed_mask(q.detach(), k.detach(), region_ids(H, W, n_win), n_win * n_win, topk)
    heads = lambda t: t.view(B, T, n_heads, hd).transpose(1, 2)  # noqa: E731  [B, h, T, hd]
    s = (heads(q) * scale) @ heads(k).transpose(-1, -2)  # [B, h, T, T]
    attn = s.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ heads(v)  # [B, h, T, hd]
    attn = attn.transpose(1, 2).reshape(B, H, W, C)
    src = (v.reshape(B, H, W, C) if lce_on == "v" else x).permute(0, 3, 1, 2)
    lce = F.conv2d(src, w_lce, b_lce, padding=w_lce.shape[-1] // 2, groups=C).permute(0, 2, 3, 1)
    return F.linear(attn + lce, w_o, b_o)
