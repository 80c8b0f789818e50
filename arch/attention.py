"""Dense causal multi-head attention with RoPE and grouped-query attention.

Backends (``attn_backend``): ``sdpa`` = torch.nn.functional.scaled_dot_product_attention (any device);
``xformers`` = xformers.ops.memory_efficient_attention (CUDA only); ``auto`` = xformers on CUDA tensors when
it is installed, SDPA otherwise.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import LayerContext
from .registry import MIXERS, ConfigError
from .rope import RotaryEmbedding

_HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd) + causal mask) v.

    q: [B, T, H, hd]; k, v: [B, T, Hkv, hd] with H a multiple of Hkv -> [B, T, H, hd].
    """
    if backend == "auto":
        backend = "xformers" if _HAS_XFORMERS and q.is_cuda else "sdpa"
    if backend == "xformers":
        if not q.is_cuda:
            raise RuntimeError("attn_backend='xformers' needs CUDA tensors; use attn_backend='sdpa' or 'auto' on CPU")
        import xformers.ops as xops

        rep = q.shape[2] // k.shape[2]
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        return xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.shape[2] != k.shape[2]
    )
    return y.transpose(1, 2)


class Tap(nn.Module):
    """A named identity point for analysis tools: ``register_forward_hook`` on it sees the tensors passing through
    (a mixer's rotated q, k, v; a sparse mixer's selection) without changing the model; no parameters."""

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensors


@MIXERS.register("dense")
class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: Q, K, V and output projections of the model's ``proj`` kind."""

    def __init__(self, ctx: LayerContext, *, attn_backend: Literal["auto", "sdpa", "xformers"] = "auto"):
        super().__init__()
        if attn_backend == "xformers" and not _HAS_XFORMERS:
            raise ConfigError(
                "mixer.attn_backend: 'xformers' was asked for but xformers is not installed "
                "(pip install 'adaptive-compute[xformers]', CUDA only); allowed values: auto, sdpa, xformers"
            )
        self.n_heads, self.n_kv_heads, self.head_dim = ctx.n_heads, ctx.n_kv_heads, ctx.head_dim
        self.attn_backend = attn_backend
        d, hd = ctx.d_model, ctx.head_dim
        self.q = ctx.make_proj(d, ctx.n_heads * hd, "qkv")
        self.k = ctx.make_proj(d, ctx.n_kv_heads * hd, "qkv")
        self.v = ctx.make_proj(d, ctx.n_kv_heads * hd, "qkv")
        self.o = ctx.make_proj(ctx.n_heads * hd, d, "proj")
        self.rope = RotaryEmbedding(hd, ctx.max_seq_len, ctx.rope_theta, ctx.rope_fraction)
        self.qkv_tap = Tap()  # hooks read the rotated q, k and v here

    @classmethod
    def core_only(cls, ctx: LayerContext, **options) -> CausalSelfAttention:
        """The mixer without its Q/K/V/output projections and RoPE: only the selection and attention over given
        (rotated) q, k, v (``attend``, ``attend_step``), for a host model that brings its own projections and
        positions (``arch.interop`` keeps a pretrained model's)."""
        mixer = cls(ctx, **options)
        for name in ("q", "k", "v", "o", "rope"):
            delattr(mixer, name)
        return mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape  # [B, T, D]
        q = self.rope(self.q(x).view(B, T, self.n_heads, self.head_dim))  # [B, T, H, hd]
        k = self.rope(self.k(x).view(B, T, self.n_kv_heads, self.head_dim))  # [B, T, Hkv, hd]
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim)
        y = self.attend(*self.qkv_tap(q, k, v))  # [B, T, H, hd]
        return self.o(y.reshape(B, T, self.n_heads * self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of q [B, T, H, hd] over k, v [B, T, Hkv, hd] -> [B, T, H, hd]; sparse mixers override
        this (and only this)."""
        return causal_attention(q, k, v, self.attn_backend)

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """Incremental decoding: x [B, 1, D] is the token at position ``cache["t"]`` (0 when empty); its keys and
        values are appended to ``cache["k"]``, ``cache["v"]`` ([B, t+1, Hkv, hd]) -> [B, 1, D]. Equals the last
        row of ``forward`` on the whole sequence."""
        B, t = x.shape[0], cache.get("t", 0)
        q = self.rope(self.q(x).view(B, 1, self.n_heads, self.head_dim), offset=t)  # [B, 1, H, hd]
        k = self.rope(self.k(x).view(B, 1, self.n_kv_heads, self.head_dim), offset=t)  # [B, 1, Hkv, hd]
        v = self.v(x).view(B, 1, self.n_kv_heads, self.head_dim)
        for name, new in (("k", k), ("v", v)):
            cache[name] = new if t == 0 else torch.cat([cache[name], new], dim=1)
        y = self.attend_step(q, cache)  # [B, 1, H, hd]
        cache["t"] = t + 1
        return self.o(y.reshape(B, 1, self.n_heads * self.head_dim))

    def attend_step(self, q: torch.Tensor, cache: dict) -> torch.Tensor:
        """Attention of the newest query q [B, 1, H, hd] over every cached key (``cache["k"]``, ``cache["v"]``,
        current token included) -> [B, 1, H, hd]; sparse mixers override this for decoding."""
        return attend_keys(q, cache["k"], cache["v"])


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The probabilities of dense causal attention, materialised (for analysis: labels, recall):
    q [B, T, H, hd], k [B, T, Hkv, hd] -> [B, H, T, T], row i = softmax_j(q_i · k_j / √hd) over j <= i."""
    T, H, hd = q.shape[1], q.shape[2], q.shape[3]
    k = k.repeat_interleave(H // k.shape[2], dim=2)  # GQA: query head h reads kv head h // (H / Hkv)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * hd**-0.5  # [B, H, T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    return s.masked_fill(future, float("-inf")).softmax(-1)


def attend_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hd)) v for decoding: q [B, 1, H, hd] over k, v [B, S, Hkv, hd]; ``visible`` (BoolTensor
    [B, S]) masks keys out -> [B, 1, H, hd]."""
    mask = None if visible is None else visible[:, None, None, :]  # [B, 1, 1, S]
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=q.shape[2] != k.shape[2]
    )
    return y.transpose(1, 2)
