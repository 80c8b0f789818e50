"""Forward-only block-sparse attention for one selection shared by all heads (inference, e.g. prefill).

When no gradient is needed and the selection is the same for every head (``Hs == 1``: DHSA, 1-D causal BRA),
the selected key blocks are gathered once per sequence for all heads (grouped-query heads stay grouped) and the
visibility mask is built once per sequence, not once per head; each chunk of query blocks then runs PyTorch's
fused ``scaled_dot_product_attention`` over its gathered keys, as a 4-D call whose batch is (sequence, query
block) and whose heads are the key/value heads, the query heads of a group stacked along the query length (other
layouts, or ``enable_gqa``, fall back to PyTorch's unfused path on CPU). Same semantics as ``chunked.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shared_selection_attention(q, k, v, idx, slot_ok, token_mask, key_ok, causal: bool, scale: float, chunk: int):
    """q [B, nqb, qbs, H, hd]; k, v [B, nkb, bs, Hkv, hd]; idx, slot_ok [B, nqb, S]; token_mask [B, nqb, qbs, S]
    or None; key_ok [B, nkb, bs]. -> [B, nqb, qbs, H, hd]."""
    B, nqb, qbs, H, hd = q.shape
    bs, Hkv = k.shape[2], k.shape[3]
    rep = H // Hkv
    rows = torch.arange(B, device=q.device)[:, None, None]
    out = torch.empty_like(q)
    for c0 in range(0, nqb, chunk):
        c1 = min(c0 + chunk, nqb)
        nc = c1 - c0
        idx_c = idx[:, c0:c1]  # [B, nc, S]
        kg = k[rows, idx_c].flatten(2, 3).permute(0, 1, 3, 2, 4).flatten(0, 1)  # [B·nc, Hkv, S·bs, hd]
        vg = v[rows, idx_c].flatten(2, 3).permute(0, 1, 3, 2, 4).flatten(0, 1)
        allowed = (key_ok[rows, idx_c] & slot_ok[:, c0:c1, :, None])[:, :, None]  # [B, nc, 1, S, bs]
        if token_mask is not None:
            allowed = allowed & token_mask[:, c0:c1, :, :, None]  # [B, nc, qbs, S, bs]
        if causal:
            kpos = idx_c[..., None] * bs + torch.arange(bs, device=q.device)  # [B, nc, S, bs]
            qpos = torch.arange(c0 * qbs, c1 * qbs, device=q.device).view(c1 - c0, qbs)
            allowed = allowed & (kpos[:, :, None] <= qpos[None, :, :, None, None])
        allowed = allowed.flatten(-2).expand(B, nc, qbs, -1)  # [B, nc, qbs, S·bs]
        mask = allowed[:, :, None].expand(B, nc, rep, qbs, -1).reshape(B * nc, 1, rep * qbs, -1)
        qc = q[:, c0:c1].view(B, nc, qbs, Hkv, rep, hd).permute(0, 1, 3, 4, 2, 5).reshape(B * nc, Hkv, rep * qbs, hd)
        o = F.scaled_dot_product_attention(qc, kg, vg, attn_mask=mask, scale=scale)  # [B·nc, Hkv, rep·qbs, hd]
        o = o.view(B, nc, Hkv, rep, qbs, hd).permute(0, 1, 4, 2, 3, 5).reshape(B, nc, qbs, H, hd)
        out[:, c0:c1] = torch.where(allowed.any(-1)[..., None, None], o, 0.0)  # a query that sees no key: zeros
    return out
