"""Block-sparse attention for per-query selections (``q_block_size == 1``), grouped by key block.

When every query has its own list of S key blocks, gathering S blocks of K and V *per query* copies S·block_size
keys for each query. Instead, each (query, selected key block) pair is sent to its key block: the queries that
selected block b are packed into a padded group, attend to block b's keys with one dense matmul, and leave a
partial output and log-sum-exp; each query's S partial results are then merged (the log-sum-exp merge of
FlashAttention's split-KV / FlashDecoding). What is copied is S copies of each *query*, not of the keys.
Plain autograd ops: the backward pass is PyTorch's.
"""

from __future__ import annotations

import torch


def per_query_attention(q, k, v, sel, key_ok, causal: bool, scale: float) -> torch.Tensor:
    """q [N, T, hd]; k, v [N, nkb, bs, hd]; sel [N, T, S] key block per slot (-1 = unused); key_ok [N, nkb, bs].
    -> [N, T, hd]."""
    N, T, hd = q.shape
    nkb, bs, S = k.shape[1], k.shape[2], sel.shape[-1]
    ok = (sel >= 0).flatten()  # [N·T·S] pairs
    pair = torch.arange(N * T * S, device=q.device)[ok]  # valid pairs, flat (n, t, s)
    row = pair // S  # flat query row n·T + t
    group = (row // T) * nkb + sel.flatten()[ok]  # flat key block n·nkb + b
    order = torch.argsort(group, stable=True)
    pair, row, group = pair[order], row[order], group[order]
    G = N * nkb
    counts = torch.bincount(group, minlength=G)  # [G] queries per key block
    rank = torch.arange(len(group), device=q.device) - (torch.cumsum(counts, 0) - counts)[group]  # inside its group
    # groups of very different sizes (early blocks are candidates for more queries) are cut into sub-groups of
    # at most `width` queries (the mean size), so padding at most doubles the work
    width = max(1, -(-len(group) // G))
    n_sub = -(-counts // width)  # [G] sub-groups per key block
    sub = (torch.cumsum(n_sub, 0) - n_sub)[group] + rank // width  # sub-group of each pair
    n_groups = int(n_sub.sum())
    block_of = torch.repeat_interleave(torch.arange(G, device=q.device), n_sub, output_size=n_groups)  # [n_groups]
    slot = rank % width
    qg = q.new_zeros(n_groups, width, hd).index_put((sub, slot), q.reshape(N * T, hd)[row])  # [n_groups, width, hd]
    kg, vg = k.reshape(G, bs, hd)[block_of], v.reshape(G, bs, hd)[block_of]  # [n_groups, bs, hd]
    acc = torch.promote_types(q.dtype, torch.float32)
    s = (qg @ kg.transpose(1, 2)).to(acc) * scale  # [n_groups, width, bs]
    filled = torch.bincount(sub, minlength=n_groups)  # queries in each sub-group
    allowed = key_ok.reshape(G, 1, bs)[block_of] & (torch.arange(width, device=q.device) < filled[:, None])[..., None]
    if causal:
        qpos = torch.zeros(n_groups, width, dtype=torch.long, device=q.device).index_put((sub, slot), row % T)
        kpos = (block_of % nkb)[:, None] * bs + torch.arange(bs, device=q.device)  # [n_groups, bs]
        allowed = allowed & (kpos[:, None, :] <= qpos[..., None])
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)  # [n_groups, width]
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None]).to(v.dtype)  # rows with no key: all 0
    o = p @ vg  # [n_groups, width, hd] partial outputs
    # merge each query's S partial results: weights softmax over its pairs' log-sum-exps
    lse_q = torch.full((N * T * S,), float("-inf"), dtype=acc, device=q.device).index_put((pair,), lse[sub, slot])
    o_q = q.new_zeros(N * T * S, hd).index_put((pair,), o[sub, slot])
    w = torch.softmax(lse_q.view(N * T, S), -1).nan_to_num(0.0).to(q.dtype)  # [N·T, S]
    return (w[..., None] * o_q.view(N * T, S, hd)).sum(1).view(N, T, hd)
