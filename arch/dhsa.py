"""Dynamic hierarchical sparse attention (DHSA: Xiong et al., "Long-Context Modeling with Dynamic Hierarchical
Sparse Attention for On-Device LLMs", arXiv 2510.24606), a *selector* over ``kernels.block_sparse``.

Per layer and sequence:

1. **Chunking** (Sec. 3.1). A boundary score for every position p (a boundary = a chunk starts at p) from the
   post-RoPE keys around p: the paper's learned ``BoundaryPredictor``, a parameter-free key-similarity score,
   or fixed-size chunks (the paper's "block sparse" baseline). Positions whose score exceeds ``threshold`` and is
   the maximum within ``nms_radius`` (1-D non-maximum suppression) start a chunk; so does every multiple of
   ``max_chunk``, which bounds chunk length.
2. **Chunk representations** (Sec. 3.2): Q_c = √|C| · mean of the chunk's queries, K_c likewise for keys
   (averaged over heads: one selection for all heads), and chunk similarity S_c = Q_c K_cᵀ.
3. **Selection** (Sec. 3.3): S_c upsampled to tokens (every key token scores as its chunk). Each block of
   ``query_block`` queries sees a budget of ``budget`` key tokens: the ``n_init`` initial tokens and the
   ``n_recent`` tokens before the block (plus the block itself) are forced; the rest of the budget goes to the
   key tokens of highest score (whole chunks in score order; the chunk that crosses the budget contributes its
   most recent tokens).
4. **Attention** only over the selected keys: ``block_sparse_attention`` with one key per slot
   (``block_size=1``), causally masked.

Query modes (``mode``):

* ``causal`` (default; the only one training accepts): the selection of a query block starting at i0 uses only
  positions <= i0, so the LM stays causal. Its query representation is Q = √n · mean of the n = query_block
  queries ending at i0; candidates are the *closed* chunks, whose end boundary is already decided at i0
  (a boundary at p depends on keys up to p + ``lookahead``); the tokens after the last closed chunk are forced
  like the recent ones. This is what makes decoding (``attend_step``) possible: chunk summaries are extended as
  boundaries are decided, one chunk at a time, and each new query block selects over the chunks built so far.
* ``prefill`` (inference only, as the authors' code runs it): every chunk is a candidate, and the query block's
  representation (``query_rep``) is, by default (``block``), √n · the mean of the block's own n queries: the
  released code's (legacy/utils/helper.py, ``avgpool_norm``). ``chunks``: the mean over the block's positions
  of their chunks' Q_c, our reading of the paper's text (Q_c per chunk, upsampled); both see later positions.

Boundary predictor (``chunker: learned``): ``predictor_residual: false`` is the released LayerNorm(attn(x)),
true (default) our LayerNorm(x + attn(x)); ``shared_predictor`` loads one predictor for every layer (the
authors train one on all layers' keys); ``share_boundaries`` chunks once, in the first DHSA layer of a forward,
and every later DHSA layer reuses those chunks (the authors chunk layer 0's keys and share them).

Departures from the authors' code (PAPERS.md): non-maximum suppression keeps local maxima within the radius
instead of greedy suppression in score order (greedy decisions chain arbitrarily far into the future, local ones
are decided ``nms_radius`` positions later), and chunk length is capped by ``max_chunk`` instead of the
chunk count by (L // block) · 8 (NMS already spaces boundaries by more than ``nms_radius``); by default each DHSA
layer chunks its own keys with its own predictor; the budget counts the keys before the block, the n_init
initial tokens are forced on top of the scored ones (the released code splices them over the earliest selected
slots), ties inside a chunk go to its most recent tokens; the last 64 query positions are not made dense.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kernels.block_sparse import block_sparse_attention
from kernels.block_sparse.api import Impl

from .attention import CausalSelfAttention, Tap, attend_keys
from .config import LayerContext
from .registry import MIXERS, ConfigError

Chunker = Literal["similarity", "learned", "fixed"]
LEARNED_THRESHOLD = 1.1  # default boundary threshold on the learned predictor's logit (authors' code)
Mode = Literal["causal", "prefill"]
SELECT_ELEMENTS = 1 << 20  # the selection works on [B, query blocks, <= T] tensors of about this many elements


def key_windows(k: torch.Tensor, window: int, p0: int, p1: int) -> torch.Tensor:
    """The 2·window keys around each candidate boundary p in [p0, p1): positions p-window .. p+window-1, zeros
    outside the sequence. k: [B, T, C] -> [B, p1-p0, 2·window, C]."""
    T = k.shape[1]
    lo, hi = max(p0 - window, 0), min(p1 + window - 1, T)
    kp = F.pad(k[:, lo:hi], (0, 0, lo - (p0 - window), (p1 + window - 1) - hi))  # [B, p1-p0+2w-1, C]
    return kp.unfold(1, 2 * window, 1).transpose(-1, -2)


class BoundaryPredictor(nn.Module):
    """The paper's boundary predictor (authors' code, legacy/boundary_predictor/models.py
    ``BoundarySimilarityAttn``): multi-head attention over the 2w keys around a candidate boundary p, then
    LayerNorm, of attn(x) (``residual=False``, the released choice) or of x + attn(x) (``residual=True``); the two
    halves are mean-pooled into l and r; features [l, r, |l − r|, l ⊙ r, cos(l, r)] -> Linear -> ReLU -> Linear
    -> boundary logit. Our logit at p (a chunk starts at p, keys p−w .. p+w−1) is the released logit at p − 1
    (the gap after p − 1)."""

    def __init__(self, dim: int, n_heads: int, window: int = 4, hidden: int = 256, residual: bool = True):
        super().__init__()
        self.dim, self.n_heads, self.window, self.hidden, self.residual = dim, n_heads, window, hidden, residual
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(4 * dim + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, k: torch.Tensor, p0: int = 0, p1: Optional[int] = None, span: int = 4096) -> torch.Tensor:
        """k: [B, T, dim] keys (all kv heads concatenated) -> logits [B, p1 - p0] of a boundary at p0..p1-1."""
        B, T, _ = k.shape
        p1 = T if p1 is None else p1
        out = []
        for a in range(p0, p1, span):  # bounded memory: 2w copies of `span` keys at a time
            x = key_windows(k.to(self.norm.weight.dtype), self.window, a, min(a + span, p1)).flatten(0, 1)
            a = self.attn(x, x, x, need_weights=False)[0]  # [n, 2w, dim]
            h = self.norm(x + a if self.residual else a)
            l, r = h[:, : self.window].mean(1), h[:, self.window :].mean(1)  # noqa: E741
            feats = torch.cat([l, r, (l - r).abs(), l * r, F.cosine_similarity(l, r, dim=-1)[:, None]], dim=-1)
            out.append(self.mlp(feats).view(B, -1))
        return torch.cat(out, dim=1)


def similarity_scores(
    k: torch.Tensor, window: int, p0: int = 0, p1: Optional[int] = None, span: int = 2048
) -> torch.Tensor:
    """Parameter-free boundary score: −cos(mean of the ``window`` keys before p, mean of the ``window`` keys from
    p on). k: [B, T, C] -> [B, p1 - p0]."""
    k, p1 = k.float(), k.shape[1] if p1 is None else p1
    out = []
    for a in range(p0, p1, span):  # bounded memory: 2w copies of `span` keys at a time
        x = key_windows(k, window, a, min(a + span, p1))
        out.append(-F.cosine_similarity(x[:, :, :window].mean(2), x[:, :, window:].mean(2), dim=-1))
    return torch.cat(out, dim=1)


def nms_starts(
    scores: torch.Tensor, threshold: float, nms_radius: int, max_chunk: int, offset: int = 0
) -> torch.Tensor:
    """Chunk starts from boundary scores [B, T] of positions offset.. -> [B, T] bool: a chunk starts at p if its
    score exceeds ``threshold`` and is the maximum within ``nms_radius`` positions on either side, the first of
    equal maxima (1-D non-maximum suppression), and at every multiple of ``max_chunk`` (position 0 included)."""
    T = scores.shape[1]
    pos = torch.arange(offset, offset + T, device=scores.device)
    start = scores > threshold
    r = nms_radius
    if r:  # a local maximum within r on either side; of equal maxima the first
        m = F.max_pool1d(F.pad(scores, (r, r), value=float("-inf"))[:, None], r, stride=1)[:, 0]  # [B, T + r + 1]
        start &= (scores > m[:, :T]) & (scores >= m[:, r + 1 :])  # max of s[p-r .. p-1], of s[p+1 .. p+r]
    return start | (pos % max_chunk == 0)


def span_reps(total: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """√|C| · mean over spans C from their sums: total [B, n, C] float64, length [B, n] -> total / √|C| [B, n, C]
    float32 (zeros for empty spans)."""
    return (total / length.clamp_min(1)[..., None].double().sqrt()).float()


def chunk_sums(x: torch.Tensor, cid: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, T, C] summed over each of the n chunks (cid [B, T]: chunk of each position) -> [B, n, C] float64."""
    B, T, C = x.shape
    rows = (cid + n * torch.arange(B, device=cid.device)[:, None]).flatten()
    return x.new_zeros(B * n, C, dtype=torch.float64).index_add_(0, rows, x.reshape(B * T, C).double()).view(B, n, C)


def block_sums(x: torch.Tensor, size: int, n: int, shift: int) -> torch.Tensor:
    """x [B, T, C] summed over the n spans [b·size − shift, (b+1)·size − shift) (zeros outside the sequence)
    -> [B, n, C] float64."""
    T = x.shape[1]
    return F.pad(x.double(), (0, 0, shift, n * size - T - shift)).view(x.shape[0], n, size, -1).sum(2)


def prefix_sums(x: torch.Tensor) -> torch.Tensor:
    """[B, T, C] -> [B, T+1, C] float64, P[:, j] = sum of x[:, :j] (decoding's running sums, built at once; the
    scan runs along the last dimension, faster on CPU than along T, with the same additions in the same order)."""
    return F.pad(x.double().transpose(1, 2).cumsum(-1).transpose(1, 2), (0, 0, 1, 0))


def chunk_reps(P: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``span_reps`` of chunks [start, end) (start, end [B, n]) from prefix sums P [B, T+1, C] (decoding's
    running sums) -> [B, n, C] float32."""
    idx = lambda i: i[..., None].expand(*i.shape, P.shape[-1])  # noqa: E731
    return span_reps(P.gather(1, idx(end)) - P.gather(1, idx(start)), end - start)


def chunk_table(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """starts [B, T] bool (starts[:, 0] True) -> chunk of each token cid [B, T], chunk start / end (exclusive)
    [B, nC]; sequences with fewer chunks are padded with empty chunks at T."""
    B, T = starts.shape
    cid = starts.long().cumsum(1) - 1  # [B, T]
    nC = int(cid[:, -1].max()) + 1
    pos = torch.arange(T, device=starts.device).expand(B, T)
    start = torch.full((B, nC), T, device=starts.device).scatter_reduce(1, cid, pos, "amin")
    end = torch.full((B, nC), T, device=starts.device).scatter_reduce(1, cid, pos + 1, "amax", include_self=False)
    return cid, start, end


def select_quota(
    qrep: torch.Tensor,
    krep: torch.Tensor,
    c_start: torch.Tensor,
    c_end: torch.Tensor,
    i0: torch.Tensor,
    i1: torch.Tensor,
    *,
    budget: int,
    n_init: int,
    n_recent: int,
    lookahead: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selection of each query block [i0, i1): how many key tokens each chunk contributes.

    qrep [B, nb, D] block query representations; krep [B, nC, D] chunk key representations K_c with chunks
    [c_start, c_end) [B, nC]; i0, i1 [nb]. ``lookahead`` None = prefill mode (every chunk is a candidate),
    else causal mode: only chunks with c_end + lookahead <= i0 (their end boundary decided by i0).
    Returns quota [B, nb, nC] (chunk c gives its quota most recent candidate tokens), top [B, nb, nC] (the end
    of c's candidate span) and rstart [B, nb]: the block sees [0, n_init) ∪ [rstart, i1) ∪ the quota tokens.
    """
    B, nb = qrep.shape[:2]
    real = (c_end > c_start)[:, None, :]  # [B, 1, nC]
    recent = (i0 - n_recent).clamp_min(0)[None, :].expand(B, nb)  # [B, nb]
    if lookahead is None:
        usable = real.expand(B, nb, -1)
        rstart = recent
    else:  # causal: the tokens after the last closed chunk are forced too
        usable = real & (c_end[:, None, :] + lookahead <= i0[None, :, None])  # [B, nb, nC]
        rstart = torch.minimum(recent, (c_end[:, None, :] * usable).amax(-1))
    lo = c_start.clamp_min(n_init)[:, None, :]  # candidate span of chunk c for block b: [lo, top)
    top = torch.minimum(c_end[:, None, :], rstart[..., None])  # [B, nb, nC]
    avail = torch.where(usable, (top - lo).clamp_min(0), 0)  # candidate tokens per chunk
    left = (budget - forced_count(rstart, i0, n_init)).clamp_min(0)  # [B, nb] budget for the top-scored tokens
    score = (qrep @ krep.transpose(1, 2)).masked_fill(avail == 0, float("-inf"))  # [B, nb, nC] = Q_c K_cᵀ
    order = score.argsort(dim=-1, descending=True, stable=True)
    a = avail.gather(-1, order)
    taken = torch.minimum((left[..., None] - (a.cumsum(-1) - a)).clamp_min(0), a)  # whole chunks, then a part
    return torch.zeros_like(avail).scatter(-1, order, taken), top, rstart


def forced_count(rstart: torch.Tensor, i0: torch.Tensor, n_init: int) -> torch.Tensor:
    """|[0, n_init) ∪ [rstart, i0)|: the forced keys before a query block [i0, ...); rstart [B, nb], i0 [nb]."""
    init = i0.clamp_max(n_init)[None]
    return torch.where(rstart <= init, i0[None], init + i0[None] - rstart)


def selected_keys(
    quota: torch.Tensor,
    top: torch.Tensor,
    rstart: torch.Tensor,
    i0: torch.Tensor,
    i1: torch.Tensor,
    n_init: int,
    T: int,
) -> torch.Tensor:
    """The key positions each query block sees, ascending, -1 padded: LongTensor [B, nb, S].

    quota, top [B, nb, nC], rstart [B, nb] from ``select_quota``; blocks [i0, i1) [nb]; keys 0..T-1. The block
    sees [0, n_init) ∪ [rstart, i1) and the last quota tokens before top of each chunk; these are disjoint
    ranges in position order (the chunks' candidate spans lie in [n_init, rstart)), so the positions are
    listed range by range, without scanning the T keys. S = the budget's bound; a longer list keeps its
    earliest S."""
    B, nb, nC = quota.shape
    S = min(max(int((forced_count(rstart, i0, n_init) + (i1 - i0)[None] + quota.sum(-1)).max()), 1), T)
    a, e = min(n_init, T), i1.clamp_max(T)[None].expand(B, nb)  # [0, a) ∪ [rstart, e): forced
    rec_end = torch.where(rstart <= a, e.clamp_min(a), e)  # [rstart, rec_end) holds what [0, a) does not
    first = torch.cat([torch.zeros_like(rstart)[..., None], top - quota, rstart[..., None]], -1)  # [B, nb, nC+2]
    length = torch.cat([rstart.clamp_max(a)[..., None], quota, (rec_end - rstart)[..., None]], -1)
    end = length.cumsum(-1)  # [B, nb, nC+2] end of each range in the list
    j = torch.arange(S, device=quota.device).expand(B, nb, S).contiguous()  # place in the list
    r = torch.searchsorted(end, j, right=True).clamp_max(nC + 1)  # the range holding place j
    pos = first.gather(-1, r) + j - (end - length).gather(-1, r)
    return torch.where(j < end[..., -1:], pos, -1)


def check_options(o: dict) -> None:
    """ConfigError for DHSA options (``o``: the keyword arguments) out of range or without effect."""
    for name, least in (
        ("budget", 1),
        ("query_block", 1),
        ("n_init", 0),
        ("n_recent", 0),
        ("chunk_size", 1),
        ("max_chunk", 1),
        ("window", 1),
        ("nms_radius", 0),
        ("predictor_hidden", 1),
    ):
        if o[name] < least:
            raise ConfigError(f"mixer.{name}: must be >= {least}, got {o[name]}")
    for name, default in (("predictor", None), ("predictor_residual", True), ("shared_predictor", False)):
        if o[name] != default and o["chunker"] != "learned":
            raise ConfigError(f"mixer.{name} is only used by chunker 'learned', not {o['chunker']!r}")
    if o["query_rep"] == "chunks" and o["mode"] == "causal":
        raise ConfigError(
            "mixer.query_rep: 'chunks' averages over later positions; it needs mode 'prefill' (inference only), "
            "mode 'causal' takes 'block'"
        )


@MIXERS.register("dhsa")
class DHSA(CausalSelfAttention):
    """Dynamic hierarchical sparse attention (see the module docstring). Same projections and RoPE as the dense
    mixer, so it can replace it in a trained model (``model.mixer.type=dhsa``). ``budget`` >= the context length
    is exactly dense causal attention, in both modes.

    budget: key tokens before each query block (forced + selected; the block itself is always seen).
    chunker: ``similarity`` (parameter-free), ``learned`` (``BoundaryPredictor``; weights from ``predictor``,
    a file written by ``python -m train dhsa-boundaries``, or from the checkpoint) or ``fixed`` (``chunk_size`` tokens).
    threshold: boundary score threshold (default: 1.1 on the learned logit as in the authors' code; −inf for
    ``similarity``, whose boundaries are the local maxima). mode: ``causal`` or ``prefill`` (inference only).
    query_rep (prefill): ``block`` (released code) or ``chunks``. predictor_residual, shared_predictor,
    share_boundaries: see the module docstring (false, true, true are the authors' choices).
    """

    def __init__(
        self,
        ctx: LayerContext,
        *,
        budget: int = 2048,
        chunker: Chunker = "similarity",
        mode: Mode = "causal",
        query_rep: Literal["block", "chunks"] = "block",
        query_block: int = 64,
        n_init: int = 128,
        n_recent: int = 128,
        chunk_size: int = 16,
        max_chunk: int = 64,
        window: int = 4,
        nms_radius: int = 8,
        threshold: Optional[float] = None,
        predictor: Optional[str] = None,
        predictor_hidden: int = 256,
        predictor_residual: bool = True,
        shared_predictor: bool = False,
        share_boundaries: bool = False,
        impl: Impl = "auto",
    ):
        super().__init__(ctx)
        self.impl = impl  # kernels.block_sparse implementation
        self.selection_tap = Tap()  # hooks read (q, k, selection) here
        check_options(dict(locals()))
        self.budget, self.chunker, self.mode, self.query_block = budget, chunker, mode, query_block
        self.query_rep, self.share_boundaries, self.shared = query_rep, share_boundaries, ctx.shared
        self.n_init, self.n_recent, self.chunk_size, self.max_chunk = n_init, n_recent, chunk_size, max_chunk
        self.window, self.nms_radius = window, nms_radius
        default = {"learned": LEARNED_THRESHOLD, "similarity": float("-inf"), "fixed": None}[chunker]
        self.threshold = default if threshold is None else threshold
        # a boundary at p depends on the keys up to p + lookahead (score window, then NMS over the scores)
        self.lookahead = 0 if chunker == "fixed" else nms_radius + window - 1
        if chunker == "learned":
            kv_dim = ctx.n_kv_heads * ctx.head_dim
            self.boundary = BoundaryPredictor(kv_dim, ctx.n_kv_heads, window, predictor_hidden, predictor_residual)
            if predictor is not None:
                load_predictor(self.boundary, predictor, None if shared_predictor else ctx.layer_idx)
            # a dense checkpoint has no predictor weights: keep the ones loaded here
            self._register_load_state_dict_pre_hook(self._keep_predictor)

    def _keep_predictor(self, state_dict, prefix, *args) -> None:
        for name, tensor in self.boundary.state_dict().items():
            state_dict.setdefault(f"{prefix}boundary.{name}", tensor)

    # ---- chunking -------------------------------------------------------------------------------------------
    def boundary_scores(self, k: torch.Tensor, p0: int = 0, p1: Optional[int] = None) -> torch.Tensor:
        """k [B, T, Hkv·hd] -> boundary scores [B, p1 - p0] of positions p0..p1-1."""
        if self.chunker == "learned":
            return self.boundary(k, p0, p1).float()
        return similarity_scores(k, self.window, p0, p1)

    def chunk_starts(self, k: torch.Tensor) -> torch.Tensor:
        """k [B, T, Hkv·hd] (post-RoPE) -> starts [B, T] bool: a chunk starts at p."""
        B, T, _ = k.shape
        pos = torch.arange(T, device=k.device)
        if self.chunker == "fixed":
            return (pos % self.chunk_size == 0).expand(B, T)
        return nms_starts(self.boundary_scores(k), self.threshold, self.nms_radius, self.max_chunk)

    def density(self, seq_len: int) -> float:
        """Fraction of the causal query-key pairs of a ``seq_len``-token sequence that the selection attends at
        least: a block starting at i0 sees min(i0, max(budget, forced)) keys before it (forced: the ``n_init``
        initial and ``n_recent`` recent tokens; causal mode may force a few more) and itself causally. 1.0: the
        budget or the forced tokens cover the whole context, i.e. exactly dense attention."""
        i0 = torch.arange(0, seq_len, self.query_block)  # [nb] block starts
        forced = forced_count((i0 - self.n_recent).clamp_min(0)[None], i0, self.n_init)[0]  # [nb]
        before = torch.minimum(i0, forced.clamp_min(self.budget))  # [nb]
        t = torch.arange(seq_len)
        seen = before[t // self.query_block] + t % self.query_block + 1  # [T] keys each query sees
        return float(seen.sum() / (t + 1).sum())

    def layer_chunk_starts(self, k: torch.Tensor) -> torch.Tensor:
        """This layer's chunk starts [B, T]; with ``share_boundaries``, inside a model forward, those of the first
        DHSA layer that ran in it (computed from its keys, as the authors chunk layer 0's keys once)."""
        if not (self.share_boundaries and self.shared.get("forward")):
            return self.chunk_starts(k)
        if "dhsa_starts" not in self.shared:
            self.shared["dhsa_starts"] = (self.chunk_starts(k), self.lookahead)
        starts, lookahead = self.shared["dhsa_starts"]
        if lookahead != self.lookahead or starts.shape != k.shape[:2]:
            raise ValueError(
                f"mixer.share_boundaries: the shared chunks (lookahead {lookahead}, shape {list(starts.shape)}) do "
                f"not fit this layer (lookahead {self.lookahead}, keys {list(k.shape[:2])}); give every DHSA layer "
                "that shares boundaries the same window, nms_radius and chunker"
            )
        return starts

    # ---- full sequence --------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.mode == "prefill" and self.training:
            raise RuntimeError("mixer.mode 'prefill' is inference-only (it is not causal); train with mode 'causal'")
        _, _, kv = self.selection_tap(q, k, self.select(q, k))  # kv [B, nb, S]
        return block_sparse_attention(
            q, k, v, kv[:, None], block_size=1, q_block_size=self.query_block, causal=True, impl=self.impl
        )

    @torch.no_grad()
    def select(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, hd], k [B, T, Hkv, hd] -> the key positions of each query block [B, nb, S] (-1 padded)."""
        B, T = q.shape[:2]
        qb = self.query_block
        nb = math.ceil(T / qb)
        if q.device.type == "meta":  # FLOP counting: the budgeted shape (a selection needs data)
            return torch.zeros(B, nb, min(T, self.budget + qb), dtype=torch.long, device=q.device)
        cid, c_start, c_end = chunk_table(self.layer_chunk_starts(k.flatten(2)))
        nC = c_start.shape[1]
        krep = span_reps(chunk_sums(k.float().mean(2), cid, nC), c_end - c_start)  # [B, nC, hd] K_c
        qm = q.float().mean(2)  # [B, T, hd] head-averaged queries
        i0 = torch.arange(nb, device=q.device) * qb
        i1 = i0 + qb  # not clamped to T: the budget of a block never depends on where the sequence ends
        if self.mode == "causal":  # the query_block queries ending at i0
            qrep = span_reps(block_sums(qm, qb, nb, qb - 1), (i0 + 1).clamp_max(qb).expand(B, nb))
        elif self.query_rep == "block":  # the block's own queries (released code)
            qrep = span_reps(block_sums(qm, qb, nb, 0), (i1.clamp_max(T) - i0).expand(B, nb))
        else:  # mean over the block of its positions' chunk representations Q_c
            qc = span_reps(chunk_sums(qm, cid, nC), c_end - c_start).gather(1, cid[..., None].expand(*qm.shape))
            qrep = F.pad(qc, (0, 0, 0, nb * qb - T)).view(B, nb, qb, -1).sum(2) / (i1.clamp_max(T) - i0)[None, :, None]
        lookahead = self.lookahead if self.mode == "causal" else None
        out, group = [], max(1, SELECT_ELEMENTS // T)  # query blocks at a time: [B, group, <= T] temporaries
        for g0 in range(0, nb, group):
            g = slice(g0, min(g0 + group, nb))
            quota, top, rstart = select_quota(
                qrep[:, g],
                krep,
                c_start,
                c_end,
                i0[g],
                i1[g],
                budget=self.budget,
                n_init=self.n_init,
                n_recent=self.n_recent,
                lookahead=lookahead,
            )
            out.append(selected_keys(quota, top, rstart, i0[g], i1[g], self.n_init, T))
        S = max(o.shape[-1] for o in out)
        return torch.cat([F.pad(o, (0, S - o.shape[-1]), value=-1) for o in out], dim=1)

    # ---- decoding -------------------------------------------------------------------------------------------
    def attend_step(self, q: torch.Tensor, cache: dict) -> torch.Tensor:
        """Causal-mode decoding of position t = cache["t"]: chunk boundaries are decided ``lookahead`` positions
        behind, each decided boundary closes one chunk whose K_c is appended to the chunk summaries, and at the
        start of every query block the block's selection is made over the chunks closed so far."""
        if self.mode != "causal":
            raise NotImplementedError("decoding needs mixer.mode 'causal' (prefill selections see later positions)")
        if self.share_boundaries:
            raise NotImplementedError("DHSA decoding with share_boundaries is not implemented; re-run the sequence")
        k_all, v_all = cache["k"], cache["v"]  # [B, t+1, Hkv, hd]
        B, t = q.shape[0], k_all.shape[1] - 1
        if t == 0:  # prefix sums of the head-mean queries and keys, boundary scores, closed chunks
            zero = q.new_zeros(B, 1, q.shape[-1], dtype=torch.float64)
            cache.update(
                Pq=zero, Pk=zero, scores=q.new_zeros(B, 0), chunk_start=[0], krep=q.new_zeros(B, 0, q.shape[-1])
            )
        for name, x in (("Pq", q), ("Pk", k_all[:, -1:])):  # the same sums as prefix_sums() on the whole sequence
            cache[name] = torch.cat([cache[name], cache[name][:, -1:] + x.float().mean(2).double()], dim=1)
        self._decide_boundaries(k_all.flatten(2), t, cache)
        if t % self.query_block == 0:  # a new query block: select over the closed chunks
            cache["kv"] = self._select_block(t, cache)
        kv = cache["kv"]  # [B, S] positions this block sees (forced recent ones may lie ahead)
        visible = (kv >= 0) & (kv <= t)
        return attend_keys(q, _take(k_all, kv), _take(v_all, kv), visible)

    @torch.no_grad()
    def decode_state(self, q: torch.Tensor, k: torch.Tensor) -> dict:
        """The state ``attend_step`` holds after positions 0..T-1, computed at once from a prefill's rotated
        q [B, T, H, hd] and k [B, T, Hkv, hd], so that decoding continues at position T exactly as if every
        position had been decoded one by one. The caller adds the cache's ``"k"`` and ``"v"``."""
        if self.mode != "causal":
            raise NotImplementedError("decoding needs mixer.mode 'causal' (prefill selections see later positions)")
        B, T = q.shape[:2]
        state = {"Pq": prefix_sums(q.float().mean(2)), "Pk": prefix_sums(k.float().mean(2))}
        n_scored = max(T - self.window + 1, 0) if self.chunker != "fixed" else 0  # scores known at T-1
        state["scores"] = self.boundary_scores(k.flatten(2), 0, n_scored) if n_scored else q.new_zeros(B, 0)
        decided = max(T - self.lookahead, 1)  # chunk starts at p < decided are decided at T-1
        if self.chunker == "fixed":
            starts = (torch.arange(decided, device=q.device) % self.chunk_size == 0).expand(B, -1)
        elif n_scored:
            starts = nms_starts(state["scores"], self.threshold, self.nms_radius, self.max_chunk)[:, :decided]
        else:
            starts = torch.ones(B, 1, dtype=torch.bool, device=q.device)
        if not bool((starts == starts[:1]).all()):
            raise NotImplementedError(
                "DHSA decoding keeps one chunk table per batch: decode one sequence at a time (batch size 1) or "
                "use chunker 'fixed'"
            )
        state["chunk_start"] = [0] + (starts[0, 1:].nonzero().flatten() + 1).tolist()
        bounds = torch.tensor(state["chunk_start"], device=q.device)
        state["krep"] = chunk_reps(state["Pk"], bounds[:-1].expand(B, -1), bounds[1:].expand(B, -1))  # closed
        if T % self.query_block:  # mid-block: the selection made at the block's start i0, from the chunks closed then
            i0 = T // self.query_block * self.query_block
            n = sum(1 for p in state["chunk_start"][1:] if p <= i0 - self.lookahead)
            at_i0 = {"Pq": state["Pq"], "chunk_start": state["chunk_start"][: n + 1], "krep": state["krep"][:, :n]}
            state["kv"] = self._select_block(i0, at_i0)
        return state

    def _decide_boundaries(self, k: torch.Tensor, t: int, cache: dict) -> None:
        """With keys 0..t known, decide whether a chunk starts at p = t − lookahead; if so, close the chunk
        before it and append its K_c."""
        w, r = self.window, self.nms_radius
        if self.chunker != "fixed" and t - w + 1 >= 0:  # the score of p = t-w+1 needs keys p-w .. t
            lo = max(t + 1 - 2 * w, 0)
            score = self.boundary_scores(k[:, lo:], t - w + 1 - lo, t - w + 2 - lo)  # [B, 1]
            cache["scores"] = torch.cat([cache["scores"], score], dim=1)
        p = t - self.lookahead
        if p < 1:
            return
        if self.chunker == "fixed":
            start = p % self.chunk_size == 0
        else:
            lo = max(p - r, 0)  # the scores of p-r .. p+r are known: cache["scores"] is [B, p + r + 1]
            start_b = nms_starts(cache["scores"][:, lo:], self.threshold, r, self.max_chunk, offset=lo)[:, p - lo]
            if not (bool(start_b.all()) or not bool(start_b.any())):
                raise NotImplementedError(
                    "DHSA decoding keeps one chunk table per batch: decode one sequence at "
                    "a time (batch size 1) or use chunker 'fixed'"
                )
            start = bool(start_b[0])
        if start:
            s0 = cache["chunk_start"][-1]
            span = lambda i: torch.full((k.shape[0], 1), i, device=k.device)  # noqa: E731
            rep = chunk_reps(cache["Pk"], span(s0), span(p))
            cache["krep"] = torch.cat([cache["krep"], rep], dim=1)
            cache["chunk_start"].append(p)

    def _select_block(self, i0: int, cache: dict) -> torch.Tensor:
        """The selection of the query block starting at i0, from the closed chunks -> key positions [B, S]."""
        B, hd, dev = cache["Pq"].shape[0], cache["Pq"].shape[-1], cache["Pq"].device
        bounds = torch.tensor(cache["chunk_start"], device=dev)  # starts of the closed chunks, then the last end
        krep = cache["krep"]  # [B, nC, hd]
        if len(bounds) == 1:  # no closed chunk yet: one empty placeholder
            bounds, krep = torch.zeros(2, dtype=torch.long, device=dev), krep.new_zeros(B, 1, hd)
        c_start, c_end = bounds[:-1].expand(B, -1), bounds[1:].expand(B, -1)  # [B, nC]
        lo = max(i0 + 1 - self.query_block, 0)
        span = lambda i: torch.full((B, 1), i, device=dev)  # noqa: E731
        qrep = chunk_reps(cache["Pq"], span(lo), span(i0 + 1))  # [B, 1, hd]
        i1 = torch.tensor([i0 + self.query_block], device=dev)
        i0 = torch.tensor([i0], device=dev)
        quota, top, rstart = select_quota(
            qrep,
            krep,
            c_start,
            c_end,
            i0,
            i1,
            budget=self.budget,
            n_init=self.n_init,
            n_recent=self.n_recent,
            lookahead=0,
        )
        return selected_keys(quota, top, rstart, i0, i1, self.n_init, int(i1))[:, 0]


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] at positions idx [B, S] (-1 and positions beyond T read position 0) -> [B, S, ...]."""
    idx = torch.where((idx >= 0) & (idx < x.shape[1]), idx, 0)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


def load_predictor(module: BoundaryPredictor, path: str | Path, layer: Optional[int]) -> None:
    """Load a boundary predictor from a file written by ``python -m train dhsa-boundaries`` (safetensors:
    tensors ``layers.<i>.<name>``, or ``shared.<name>`` for one predictor of all layers; metadata dim, n_heads,
    window, hidden, and residual, "1" when absent): layer ``layer``'s, or the shared one when ``layer`` is None."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"mixer.predictor: {path} does not exist (write it with `python -m train dhsa-boundaries`)")
    with safe_open(str(path), framework="pt") as f:
        meta = {"residual": "1", **(f.metadata() or {})}
        want = {"dim": module.dim, "n_heads": module.n_heads, "window": module.window, "hidden": module.hidden}
        want["residual"] = int(module.residual)
        got = {key: int(meta[key]) for key in want if key in meta}
        if got != want:
            raise ConfigError(f"mixer.predictor: {path} holds predictors with {got}; this layer needs {want}")
        prefix = "shared." if layer is None else f"layers.{layer}."
        names = [n for n in f.keys() if n.startswith(prefix)]
        if not names:
            held = sorted(
                {n.split(".")[0] if n.startswith("shared.") else ".".join(n.split(".")[:2]) for n in f.keys()}
            )
            raise ConfigError(f"mixer.predictor: {path} has no {prefix[:-1]} predictor; it holds {held}")
        if module.norm.weight.is_meta:  # config validation builds the model on the meta device: file checked, done
            return
        module.load_state_dict({n[len(prefix) :]: f.get_tensor(n) for n in names})
