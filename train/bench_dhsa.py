"""``python -m train bench-dhsa``: prefill latency and peak memory of one attention layer, DHSA against dense
attention and the fixed-block-sparse baseline at the same budget, in one run.

One layer's attention on a prompt of T tokens (batch 1; default 8 query heads, 2 key/value heads of 64 dims,
fp32 on CPU, bf16 on CUDA), forward only (prefill), from the rotated q, k, v:

* ``dense SDPA``: causal ``scaled_dot_product_attention`` (fused, memory O(T)).
* ``dense eager``: softmax(q kᵀ) v with the T×T scores materialised — what Hugging Face's Gemma-2 runs (its
  logit soft-capping rules out the fused kernels), i.e. the paper's dense baseline; skipped above ``--eager-max-gib``
  of scores, and reported as the memory it would need.
* ``DHSA``: chunking (key-similarity chunker), chunk selection and the block-sparse core, ``mode`` prefill.
* ``fixed block-sparse``: the same with fixed chunks of ``--chunk`` tokens (the paper's block-sparse baseline).

Each cell runs in fresh processes (``bench_bra``'s method): memory = peak RSS (CUDA: allocator peak) of the call
above its inputs, time = median of ``--reps`` calls after one warm-up. The paper (Gemma-2-2B, 8k prefill)
reports −20…−60% latency and −35% peak memory against dense.
"""

from __future__ import annotations

import functools

import torch

from .bench_bra import _fresh_process_cell, measure

IMPLS = ("dense SDPA", "dense eager", "DHSA", "fixed block-sparse")


def _layer(impl: str, T: int, heads: int, kv_heads: int, head_dim: int, budget: int, chunk: int, query_block: int):
    from arch import build_model

    mixer = {"type": "dense"}
    if impl in ("DHSA", "fixed block-sparse"):
        mixer = {
            "type": "dhsa",
            "budget": budget,
            "mode": "prefill",
            "query_block": query_block,
            "chunker": "fixed" if impl == "fixed block-sparse" else "similarity",
            "chunk_size": chunk,
        }
    cfg = {
        "d_model": heads * head_dim,
        "n_layers": 1,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "max_seq_len": T,
        "mixer": mixer,
    }
    return build_model(cfg).blocks[0].mixer.eval()


def _eager(q, k, v):
    """Dense causal attention with the scores materialised ([B, H, T, T])."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (
        q.transpose(1, 2),
        k.repeat_interleave(rep, 2).transpose(1, 2),
        v.repeat_interleave(rep, 2).transpose(1, 2),
    )
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    T = s.shape[-1]
    s.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=s.device).triu_(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def run_cell(
    impl: str,
    T: int,
    reps: int,
    device: str,
    heads: int,
    kv_heads: int,
    head_dim: int,
    budget: int,
    chunk: int,
    query_block: int,
    dtype: str,
) -> dict:
    """One (implementation, length) cell in this process: {"ms", "peak_mib", "select_ms"}."""
    from arch.attention import causal_attention

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    q = torch.randn(1, T, heads, head_dim, generator=g).to(device, dt)
    k, v = (torch.randn(1, T, kv_heads, head_dim, generator=g).to(device, dt) for _ in range(2))
    mixer = _layer(impl, T, heads, kv_heads, head_dim, budget, chunk, query_block).to(device)
    fn = {"dense SDPA": lambda: causal_attention(q, k, v, "sdpa"), "dense eager": lambda: _eager(q, k, v)}.get(
        impl, lambda: mixer.attend(q, k, v)
    )

    def call():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        out = measure(call, reps, device)
        out["select_ms"] = measure(lambda: mixer.select(q, k), reps, device)["ms"] if hasattr(mixer, "select") else 0
    return out


def bench_dhsa(
    lengths=(4096, 8192, 16384, 32768),
    budget: int = 1024,
    reps: int = 2,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    chunk: int = 16,
    query_block: int = 64,
    threads: int = 0,
    eager_max_gib: float = 6.0,
) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    mem = "peak alloc" if device == "cuda" else "peak RSS"
    cell = functools.partial(_fresh_process_cell, threads=threads, runner="train.bench_dhsa:run_cell")
    print(
        f"bench-dhsa on {device} ({dtype}, {threads or torch.get_num_threads()} threads): prefill of one attention "
        f"layer, B=1, {heads} heads / {kv_heads} kv heads x {head_dim}; DHSA and fixed block-sparse: budget {budget} "
        f"keys per query block of {query_block}; memory = {mem} above the inputs, time = median of {reps}\n"
    )
    print(
        f"| T | impl | ms | {mem} MiB | selection ms | time vs SDPA | memory vs SDPA | time vs eager | "
        "memory vs eager |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    results = {}
    for T in lengths:
        row = {}
        for impl in IMPLS:
            scores_gib = heads * T * T * torch.finfo(getattr(torch, dtype)).bits / 8 / 2**30
            if impl == "dense eager" and scores_gib > eager_max_gib:
                row[impl] = {"skipped": f"T×T scores need {scores_gib:.1f} GiB"}
                print(f"| {T} | {impl} | — | ≥ {scores_gib * 1024:.0f} (not run) | | | | | |", flush=True)
                continue
            r = row[impl] = cell(impl, T, reps, device, heads, kv_heads, head_dim, budget, chunk, query_block, dtype)
            sdpa, eager = row["dense SDPA"], row.get("dense eager", {})
            ratio = lambda a, b: f"{a / b:.2f}" if b else "—"  # noqa: E731
            print(
                f"| {T} | {impl} | {r['ms']:.0f} | {r['peak_mib']:.0f} | {r['select_ms']:.0f} | "
                f"{ratio(r['ms'], sdpa['ms'])} | {ratio(r['peak_mib'], sdpa['peak_mib'])} | "
                f"{ratio(r['ms'], eager.get('ms', 0))} | {ratio(r['peak_mib'], eager.get('peak_mib', 0))} |",
                flush=True,
            )
        results[T] = row
    return results
