"""Bi-level routing attention (BiFormer: Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing
Attention", CVPR 2023, Sec. 3.2), in 2-D for vision and in 1-D causal for language models.

Both are *selectors*: a coarse region-to-region routing step picks, for each block of queries, the key regions
it may attend to; the token-level attention over that selection is ``kernels.block_sparse``'s one
block-sparse routine, which never materialises the top-k-fold copy of K and V that the released code gathers.

* ``BiLevelRoutingAttention`` (2-D): ``[B, H, W, C] -> [B, H, W, C]``, faithful to the released code
  (rayleizhu/BiFormer, ops/bra_legacy.py) on maps divisible by ``n_win``. Departure on other maps (the released
  classification model asserts divisibility; with ``auto_pad``, its segmentation setting, it pads the normed map
  with zeros before the qkv projection, so padded tokens carry the qkv bias, enter the region means and the
  LCE, and are attended): here padded keys are masked, region means are taken over real tokens only, the LCE
  sees a zero border, and regions made only of padding are never routed (their mean would be 0/0, and a NaN
  score ranks first in ``topk``), so no query spends its top-k on them.
* ``AttentionLePE`` (2-D): stage 4 of the released BiFormer-T/S/B (models/_common.py): full attention, 8 heads,
  no qkv bias, scale head_dim**-0.5, LePE = depthwise 5×5 conv on the attention input x (not on V).
* ``CausalBRA`` (1-D, ``mixer: {type: bra}``): our causal adaptation for LMs (no public precedent).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse.api import Impl

from .attention import CausalSelfAttention, attend_keys
from .config import LayerContext
from .registry import MIXERS, ConfigError

TopK = Union[int, Literal["all"]]


def is_all(topk: TopK) -> bool:
    return topk == "all" or topk == -1


class BiLevelRoutingAttention(nn.Module):
    """2-D BRA (BiFormer Sec. 3.2, Eq. 3-6). The image is split into ``n_win``×``n_win`` regions; region-level
    q and k are the means of the *detached* per-token q and k over each region, across all channels (one routing
    for all heads); each query region keeps the ``topk`` key regions of highest ``q_r · k_rᵀ`` (Eq. 4-5) and its
    tokens attend to the tokens of those regions (Eq. 6). LCE (local context enhancement) = depthwise
    ``lce_kernel``² conv, added before the output projection: on V (``lce_input: v``, BRA in the released code)
    or on the attention input x (``x``, the released ``AttentionLePE``). ``topk: all`` (or -1) is full
    attention (+LCE) over the whole image.

    ``scale``: ``head_dim`` -> head_dim**-0.5 (standard); ``dim`` -> dim**-0.5, the released code's value.
    Sizes not divisible by ``n_win`` are padded at the bottom/right; padded keys are masked and regions holding
    no real token are never routed (see the module docstring).
    """

    def __init__(
        self,
        dim: int,
        *,
        n_win: int = 7,
        topk: TopK = 4,
        head_dim: int = 32,
        scale: Literal["head_dim", "dim"] = "head_dim",
        lce_kernel: int = 5,
        lce_input: Literal["v", "x"] = "v",
        qkv_bias: bool = True,
        impl: Impl = "auto",
    ):
        super().__init__()
        self.impl = impl  # kernels.block_sparse implementation
        if dim % head_dim:
            raise ConfigError(f"head_dim: {head_dim} does not divide the width {dim}")
        if not is_all(topk) and not 1 <= topk <= n_win**2:
            raise ConfigError(f"topk: {topk} must be in 1..n_win²={n_win**2}, or 'all' / -1 for full attention")
        if lce_input not in ("v", "x"):
            raise ConfigError(f"lce_input: {lce_input!r} is not allowed; allowed values: 'v', 'x'")
        self.dim, self.n_win, self.topk, self.lce_input = dim, n_win, topk, lce_input
        self.n_heads, self.head_dim = dim // head_dim, head_dim
        self.scale = head_dim**-0.5 if scale == "head_dim" else dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.lce = nn.Conv2d(dim, dim, lce_kernel, padding=lce_kernel // 2, groups=dim)
        self.wo = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape  # [B, H, W, C]
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # each [B, H, W, C]
        lce = self.lce((v if self.lce_input == "v" else x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, H, W, C]
        n = 1 if is_all(self.topk) else self.n_win  # full attention = one region holding every token
        rh, rw = math.ceil(H / n), math.ceil(W / n)  # region size

        def to_regions(t):  # [B, H, W, c] -> [B, n²·rh·rw, c], region-major, zero-padded
            t = F.pad(t, (0, 0, 0, n * rw - W, 0, n * rh - H))
            return t.view(B, n, rh, n, rw, -1).transpose(2, 3).reshape(B, n * n * rh * rw, -1)

        real = to_regions(torch.ones(B, H, W, 1, device=x.device)).squeeze(-1) > 0  # [B, T]: not padding
        qr, kr, vr = to_regions(q), to_regions(k), to_regions(v)  # [B, T, C]
        if n == 1:
            sel = torch.zeros(B, 1, 1, 1, dtype=torch.long, device=x.device)
        else:
            sel = route_regions(qr.detach(), kr.detach(), real, n * n, self.topk)[:, None]  # [B, 1, n², topk]
        heads = lambda t: t.view(B, -1, self.n_heads, self.head_dim)  # noqa: E731  [B, T, h, hd]
        out = block_sparse_attention(
            heads(qr), heads(kr), heads(vr), sel, block_size=rh * rw, key_mask=real, scale=self.scale, impl=self.impl
        )  # [B, T, h, hd]
        out = out.reshape(B, n, n, rh, rw, C).transpose(2, 3).reshape(B, n * rh, n * rw, C)[:, :H, :W]
        return self.wo(out + lce)


def route_regions(q: torch.Tensor, k: torch.Tensor, real: torch.Tensor, n_regions: int, topk: int) -> torch.Tensor:
    """Region-to-region routing (BiFormer Eq. 4-5): q, k [B, T, C] region-major (T = n_regions equal regions),
    real [B, T] (False = padding) -> the ``topk`` key regions of each query region [B, n_regions, topk], -1 for
    slots left over when fewer than ``topk`` regions hold a real token. Region q/k = mean over the region's
    real tokens; a region holding none is never routed to."""
    B, T, C = q.shape
    cnt = real.view(B, n_regions, -1).sum(2)  # [B, n²] real tokens per region
    q_win = q.view(B, n_regions, -1, C).sum(2) / cnt.clamp_min(1)[..., None]  # [B, n², C] (padding is zero)
    k_win = k.view(B, n_regions, -1, C).sum(2) / cnt.clamp_min(1)[..., None]
    a = (q_win @ k_win.transpose(1, 2)).masked_fill(cnt[:, None, :] == 0, float("-inf"))  # [B, n², n²]
    top = a.topk(topk, dim=-1)
    return torch.where(top.values > float("-inf"), top.indices, -1)


class AttentionLePE(BiLevelRoutingAttention):
    """Stage 4 of the released BiFormer-T/S/B (models/_common.py ``AttentionLePE``): full multi-head attention
    with ``n_heads`` heads (8 in every released model), qkv projection without bias, scale head_dim**-0.5, and
    LePE (locally-enhanced positional encoding) = depthwise ``lepe_kernel``² conv on the attention input x,
    added before the output projection. It is ``BiLevelRoutingAttention`` with one region."""

    def __init__(self, dim: int, *, n_heads: int = 8, lepe_kernel: int = 5):
        if n_heads < 1 or dim % n_heads:
            raise ConfigError(f"n_heads: {n_heads} must divide the width {dim}")
        super().__init__(
            dim,
            topk="all",
            head_dim=dim // n_heads,
            scale="head_dim",
            lce_kernel=lepe_kernel,
            lce_input="x",
            qkv_bias=False,
        )


def causal_routing(
    q: torch.Tensor, k: torch.Tensor, region_size: int, topk: TopK, query_block: int, attend_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D causal bi-level routing: which key regions each query sees, in ``block_sparse_attention``'s terms.

    q: [B, T, H, hd], k: [B, T, Hkv, hd] (detached inside). Region r's key summary k̄_r is the mean of its keys
    (all heads' channels); position t routes to the ``topk`` regions r < region(t) of highest q_t · k̄_r.
    Only complete past regions are candidates, and the score uses only q_t, so the routing of t depends on
    nothing after t. Each query also sees its own region (causally masked by the caller) and, with
    ``attend_first``, region 0.

    Returns kv_blocks [B, 1, n_query_blocks, S] (the union of the selections of a block's queries, -1 padded)
    and token_mask [B, 1, T, S] (which of those slots each query actually selected).
    """
    B, T, H, hd = q.shape
    nR, nQ = math.ceil(T / region_size), math.ceil(T / query_block)
    k = k.detach().repeat_interleave(H // k.shape[2], dim=2)
    k_bar = F.pad(k, (0, 0, 0, 0, 0, nR * region_size - T)).view(B, nR, region_size, H * hd).mean(2)  # [B, nR, D]
    own = torch.arange(T, device=q.device) // region_size  # [T] region of each position
    regions = torch.arange(nR, device=q.device)
    seen = regions == own[:, None]  # [T, nR] own region
    if attend_first:
        seen = seen | (regions == 0)
    seen = seen.expand(B, T, nR)
    k_sel = nR if is_all(topk) else min(topk, nR)
    if nR > 1 and k_sel > 0:
        score = q.detach().reshape(B, T, H * hd) @ k_bar.transpose(1, 2)  # [B, T, nR]
        past = regions < own[:, None]  # [T, nR] complete past regions
        top = score.masked_fill(~past, float("-inf")).topk(k_sel, dim=-1).indices  # [B, T, k]
        seen = seen | (torch.zeros_like(seen).scatter_(2, top, True) & past)
    # union over each query block; positions of the padded last block see nothing
    used = F.pad(seen, (0, 0, 0, nQ * query_block - T)).view(B, nQ, query_block, nR).any(2)  # [B, nQ, nR]
    # slots = the largest union (on the meta device, used only for FLOP counting: its upper bound)
    S = int(used.sum(-1).max()) if q.device.type != "meta" else min(nR, query_block * k_sel + 2)
    count, idx = used.to(torch.int8).topk(S, dim=-1)  # [B, nQ, S]
    # ascending, unused slots last: the core then sums the softmax in position order, as dense attention does
    kv_blocks = torch.where(count > 0, idx, nR).sort(dim=-1).values
    kv_blocks = kv_blocks.masked_fill(kv_blocks == nR, -1)
    slot_of = kv_blocks.clamp_min(0).repeat_interleave(query_block, dim=1)[:, :T]  # [B, T, S]
    token_mask = seen.gather(2, slot_of) & (kv_blocks >= 0).repeat_interleave(query_block, dim=1)[:, :T]
    return kv_blocks[:, None], token_mask[:, None]


@MIXERS.register("bra")
class CausalBRA(CausalSelfAttention):
    """Causal bi-level routing attention for LMs (``causal_routing`` selects, ``block_sparse_attention``
    attends). Same projections and RoPE as the dense mixer; routing uses the rotated q and k, so q_t · k̄_r is
    the mean attention logit of t over region r. ``topk`` >= the number of past regions (or ``all``) is exactly
    dense causal attention. ``query_block`` (must divide ``region_size``): queries per block of the sparse core.
    The core visits, for each query block, the union of its queries' selections (masked per query), so the
    default ``region_size`` suits short contexts, while ``1`` (per-query selections, grouped by key block) keeps
    the work proportional to top-k on long ones, where a block's union approaches every past region."""

    def __init__(
        self,
        ctx: LayerContext,
        *,
        region_size: int = 64,
        topk: TopK = 4,
        attend_first: bool = False,
        query_block: Optional[int] = None,
        impl: Impl = "auto",
    ):
        super().__init__(ctx)
        self.impl = impl  # kernels.block_sparse implementation
        query_block = query_block or region_size
        if region_size < 1 or region_size % query_block:
            raise ConfigError(f"mixer.query_block: {query_block} must divide mixer.region_size={region_size}")
        if not is_all(topk) and topk < 0:
            raise ConfigError(f"mixer.topk: {topk} must be >= 0, or 'all' / -1")
        self.region_size, self.topk, self.attend_first, self.query_block = region_size, topk, attend_first, query_block

    def density(self, seq_len: int) -> float:
        """Fraction of the causal query-key pairs of a ``seq_len``-token sequence that the routing attends at
        least: a query in region r sees min(r, topk) whole past regions (at least region 0 with ``attend_first``;
        a routing may add region 0 to its top-k) and its own region causally. 1.0: every past region is always
        seen, i.e. exactly dense attention."""
        t = torch.arange(seq_len)
        r = t // self.region_size  # [T] region of each query
        past = r if is_all(self.topk) else r.clamp_max(max(self.topk, int(self.attend_first)))
        seen = past * self.region_size + t % self.region_size + 1  # [T] keys each query sees
        return float(seen.sum() / (t + 1).sum())

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv_blocks, token_mask = causal_routing(q, k, self.region_size, self.topk, self.query_block, self.attend_first)
        return block_sparse_attention(
            q,
            k,
            v,
            kv_blocks,
            block_size=self.region_size,
            q_block_size=self.query_block,
            causal=True,
            token_mask=token_mask,
            impl=self.impl,
        )

    def attend_step(self, q: torch.Tensor, cache: dict) -> torch.Tensor:
        """Decoding of position t (the newest cached key): q_t [B, 1, H, hd] routes as in ``causal_routing`` to the
        ``topk`` complete past regions of highest q_t · k̄_r, and attends to them, to its own region up to t and,
        with ``attend_first``, to region 0: exactly the keys ``forward``'s token mask gives row t."""
        k, v = cache["k"], cache["v"]  # [B, t+1, Hkv, hd]
        B, S, Hkv, hd = k.shape
        H, R = q.shape[2], self.region_size
        own = (S - 1) // R  # region of t; regions 0 .. own-1 are complete
        region = torch.arange(S, device=q.device) // R  # [S]
        visible = (region == own) | ((region == 0) if self.attend_first else False)  # [S]
        visible = visible.expand(B, S)
        k_sel = own if is_all(self.topk) else min(self.topk, own)
        if k_sel > 0:
            k_past = k[:, : own * R].detach().repeat_interleave(H // Hkv, dim=2)  # [B, own·R, H, hd]
            k_bar = k_past.reshape(B, own, R, H * hd).mean(2)  # [B, own, H·hd]
            score = (q.detach().reshape(B, 1, H * hd) @ k_bar.transpose(1, 2))[:, 0]  # [B, own]
            chosen = torch.zeros(B, own, dtype=torch.bool, device=q.device)
            chosen.scatter_(1, score.topk(k_sel, dim=-1).indices, True)  # [B, own] routed regions
            visible = visible | F.pad(chosen.repeat_interleave(R, dim=1), (0, S - own * R))
        return attend_keys(q, k, v, visible)
