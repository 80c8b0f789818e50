"""Forward-only block-sparse attention for one selection shared by all heads (inference, e.g. prefill).

When no gradient is needed and the selection is the same for every head (``Hs == 1``: DHSA, 1-D causal BRA),
the selected key blocks are gathered once per sequence for all heads (grouped-query heads stay grouped) and the
visibility mask is built once per sequence, not once per head; each chunk of query blocks then runs PyTorch's
fused ``scaled_dot_product_attention`` over its gathered keys. Same layout and semantics as ``chunked.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shared_selection_attention(q, k, v, idx, slot_ok, token_mask, key_ok, causal: bool, scale: float, chunk: int):
    """q [B, nqb, qbs, H, hd]; k, v [B, nkb, bs, Hkv, hd]; idx, slot_ok [B, nqb, S]; token_mask [B, nqb, qbs, S]
    or None; key_ok [B, nkb, bs]. -> [B, nqb, qbs, H, hd]."""
    B, nqb, qbs, H, hd = q.shape
    bs, Hkv = k.shape[2], k.shape[3]
    rows = torch.arange(B, device=q.device)[:, None, None]
    out = torch.empty_like(q)
    for c0 in range(0, nqb, chunk):
        c1 = min(c0 + chunk, nqb)
        idx_c = idx[:, c0:c1]  # [B, nc, S]
        kg = k[rows, idx_c].flatten(2, 3).permute(0, 1, 3, 2, 4)  # [B, nc, Hkv, S·bs, hd]
        vg = v[rows, idx_c].flatten(2, 3).permute(0, 1, 3, 2, 4)
        allowed = (key_ok[rows, idx_c] & slot_ok[:, c0:c1, :, None])[:, :, None]  # [B, nc, 1, S, bs]
        if token_mask is not None:
            allowed = allowed & token_mask[:, c0:c1, :, :, None]  # [B, nc, qbs, S, bs]
        if causal:
            kpos = idx_c[..., None] * bs + torch.arange(bs, device=q.device)  # [B, nc, S, bs]
            qpos = torch.arange(c0 * qbs, c1 * qbs, device=q.device).view(c1 - c0, qbs)
            allowed = allowed & (kpos[:, :, None] <= qpos[None, :, :, None, None])
        allowed = allowed.flatten(-2)[:, :, None]  # [B, nc, 1, qbs or 1, S·bs]
        o = F.scaled_dot_product_attention(q[:, c0:c1].transpose(2, 3), kg, vg, attn_mask=allowed, scale=scale,
                                           enable_gqa=H != Hkv)  # fmt: skip  # [B, nc, H, qbs, hd]
        out[:, c0:c1] = torch.where(allowed.any(-1, keepdim=True), o, 0.0).transpose(2, 3)  # no key: zeros
    return out
