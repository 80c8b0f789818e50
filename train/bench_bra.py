"""``python -m train bench-bra``: bi-level routing attention against its baselines, in one run.

Table 1 (2-D, the issue's BiFormer-S stage-3 shape: 14×14 tokens, width 256, 8 heads, 7×7 regions of 2×2,
top-16, batch 64): the block-sparse core against the gather reference (BiFormer's released algorithm, which
copies the top-k regions of K and V for every query region).
Table 2 (1-D causal, one layer's attention, batch 1, 4 heads of 64): causal BRA (routing + block-sparse core)
against dense causal SDPA at several lengths.

Each cell runs in fresh processes: memory is the peak resident set size of the operation above what its
inputs already hold (``/proc/self/clear_refs`` resets the peak; on CUDA the allocator's peak), time the median of
``--reps`` runs after one warm-up. Ratios compare cells of the same run. On a shared CPU, ``--threads 1`` avoids
OpenMP barriers waiting for descheduled threads (which penalise many small ops far more than a few large ones).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _inputs_2d(batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    n_win, side, dim, hd, topk = 7, 14, 256, 32, 16
    B, T, H = batch, side * side, dim // hd
    q, k, v = (torch.randn(B, T, H, hd, generator=g).to(device).requires_grad_() for _ in range(3))
    block = (side // n_win) ** 2  # tokens per region (region-major layout)
    mean = lambda t: t.detach().reshape(B, n_win * n_win, block, dim).mean(2)  # noqa: E731
    sel = (mean(q) @ mean(k).transpose(1, 2)).topk(topk, -1).indices[:, None]  # [B, 1, 49, 16]
    return (q, k, v), sel, block


def _run_cell(
    kind: str, impl: str, mode: str, size: int, reps: int, device: str, region: int, topk: int, query_block: int
) -> dict:
    from arch.attention import causal_attention
    from arch.bra import causal_routing
    from kernels.block_sparse import block_sparse_attention
    from kernels.block_sparse.naive import gather_attention

    if kind == "2d":
        (q, k, v), sel, block = _inputs_2d(size, device)
        fn = {
            "block-sparse core": lambda: block_sparse_attention(q, k, v, sel, block_size=block),
            "gather reference": lambda: gather_attention(q, k, v, sel, block_size=block),
        }[impl]
    else:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, size, 4, 64, generator=g).to(device).requires_grad_() for _ in range(3))

        def bra():
            kv_blocks, token_mask = causal_routing(q, k, region, topk, query_block, attend_first=False)
            return block_sparse_attention(
                q, k, v, kv_blocks, block_size=region, q_block_size=query_block, causal=True, token_mask=token_mask
            )

        fn = {"causal BRA": bra, "dense SDPA": lambda: causal_attention(q, k, v, "sdpa")}[impl]

    def step():
        out = fn()
        if mode == "fwd+bwd":
            out.backward(torch.ones_like(out))
        else:
            del out
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        result = measure(step, reps, device)
    return {**result, "kv_mib": 2 * k.numel() * k.element_size() / 2**20}


def measure(fn, reps: int, device: str) -> dict:
    """Peak memory of one call of ``fn`` above what is allocated before it (CPU: peak RSS, reset through
    ``/proc/self/clear_refs``; CUDA: the allocator's peak), then the median time of ``reps`` more calls."""
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM)
    fn()  # first run: memory (and warm-up)
    peak = (torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM:")) - base
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "peak_mib": peak / 2**20}


def _fresh_process_cell(*args, threads: int = 0, runner: str = "train.bench_bra:_run_cell") -> dict:
    """Run one cell (``runner(*args)``, a "module:function" returning a dict with ``ms`` and ``peak_mib``) in
    fresh Python processes: one for time (the normal allocator), one for memory, where every allocation above
    64 KiB is its own mmap (``MALLOC_MMAP_THRESHOLD_``), returned to the system when freed, so that RSS follows
    live memory."""
    module, fn = runner.split(":")
    code = (
        f"import json, torch; torch.set_num_threads({threads} or torch.get_num_threads()); "
        f"from {module} import {fn}; print(json.dumps({fn}(*{args!r})))"
    )
    results = []
    for env in ({}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
        if out.returncode:
            raise RuntimeError(f"bench cell {args} failed:\n{out.stderr[-2000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {**results[0], "peak_mib": results[1]["peak_mib"]}


def bench_bra(
    batch: int = 64,
    lengths=(4096, 8192, 16384),
    reps: int = 3,
    region: int = 64,
    topk: int = 4,
    query_block: int = 1,
    threads: int = 0,
) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mem = "peak alloc" if device == "cuda" else "peak RSS"
    _cell = functools.partial(_fresh_process_cell, threads=threads)
    print(
        f"bench-bra on {device} ({threads or torch.get_num_threads()} threads); memory = {mem} above the inputs, "
        f"time = median of {reps}\n"
    )
    r2 = {}
    if batch:
        print(f"## 2-D BRA, BiFormer-S stage 3 (B={batch}, 14x14 tokens, dim 256, 8 heads, 7x7 regions, top-16)\n")
        print(f"| implementation | fwd ms | fwd+bwd ms | fwd+bwd {mem} MiB | K+V MiB |")
        print("|---|---:|---:|---:|---:|")
        for impl in ("gather reference", "block-sparse core"):
            f, fb = (_cell("2d", impl, m, batch, reps, device, 0, 0, 0) for m in ("fwd", "fwd+bwd"))
            r2[impl] = {"fwd_ms": f["ms"], "fb_ms": fb["ms"], "peak_mib": fb["peak_mib"]}
            print(
                f"| {impl} | {f['ms']:.0f} | {fb['ms']:.0f} | {fb['peak_mib']:.0f} | {fb['kv_mib']:.0f} |", flush=True
            )
        core, ref = r2["block-sparse core"], r2["gather reference"]
        print(
            f"\ncore / gather: peak memory {core['peak_mib'] / ref['peak_mib']:.3f}, fwd+bwd time "
            f"{core['fb_ms'] / ref['fb_ms']:.2f}, fwd time {core['fwd_ms'] / ref['fwd_ms']:.2f}\n"
        )
    if lengths:
        print(
            f"## 1-D causal BRA (region {region}, top-{topk} + own region, query blocks of {query_block}) "
            "vs dense causal SDPA, B=1, 4 heads x 64\n"
        )
        print(
            f"| T | fwd ms BRA / SDPA | fwd+bwd ms BRA / SDPA | fwd+bwd {mem} MiB BRA / SDPA | "
            "time ratio fwd / fwd+bwd | memory ratio |"
        )
        print("|---:|---:|---:|---:|---:|---:|")
    r1 = {}
    for T in lengths:
        c = {
            (impl, m): _cell("1d", impl, m, T, reps, device, region, topk, query_block)
            for impl in ("causal BRA", "dense SDPA")
            for m in ("fwd", "fwd+bwd")
        }
        b, d = "causal BRA", "dense SDPA"
        row = {
            "fwd": c[b, "fwd"]["ms"] / c[d, "fwd"]["ms"],
            "fb": c[b, "fwd+bwd"]["ms"] / c[d, "fwd+bwd"]["ms"],
            "mem": c[b, "fwd+bwd"]["peak_mib"] / max(c[d, "fwd+bwd"]["peak_mib"], 1e-9),
        }
        r1[T] = {"cells": c, **row}
        print(
            f"| {T} | {c[b, 'fwd']['ms']:.0f} / {c[d, 'fwd']['ms']:.0f} | {c[b, 'fwd+bwd']['ms']:.0f} / "
            f"{c[d, 'fwd+bwd']['ms']:.0f} | {c[b, 'fwd+bwd']['peak_mib']:.0f} / {c[d, 'fwd+bwd']['peak_mib']:.0f} | "
            f"{row['fwd']:.2f} / {row['fb']:.2f} | {row['mem']:.2f} |",
            flush=True,
        )
    return {"2d": r2, "1d": r1}


def lm_step_times(config_paths: list[str], steps: int = 8) -> dict:
    """Training-step time of several LM configs, measured interleaved (one step of each in turn, same batches)
    so that load on the machine affects all alike; prints each model's steps at the first one's budget."""
    import lightning as L

    from .config import load_config
    from .data import LMDataModule, TrainWindows
    from .module import build_optimizer, lm_loss

    cfgs = [load_config(p) for p in config_paths]
    data = LMDataModule(cfgs[0])
    data.setup()
    runs = []
    for cfg in cfgs:
        L.seed_everything(cfg["seed"], verbose=False)
        from arch import build_model

        model = build_model(cfg["model"])
        runs.append((model, build_optimizer(model, cfg)[0], []))
    c = cfgs[0]
    ds = TrainWindows(
        data.splits["train"]["tokens"], c["data"]["seq_len"], c["data"]["batch_size"], c["seed"], 0, steps + 1
    )
    for step in range(steps + 1):  # step 0: warm-up, untimed
        for model, opt, times in runs:
            t0 = time.perf_counter()
            lm_loss(model, ds[step]).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t0)
    base = statistics.median(runs[0][2])
    budget = c["trainer"]["max_steps"]
    print(
        f"\n## LM training step time, interleaved, median of {steps} steps (batch {c['data']['batch_size']}x"
        f"{c['data']['seq_len']})\n"
    )
    print(f"| config | step ms | ratio | steps in {config_paths[0]}'s budget ({budget} steps) |")
    print("|---|---:|---:|---:|")
    out = {}
    for path, (_, _, times) in zip(config_paths, runs):
        ms = 1e3 * statistics.median(times)
        out[path] = {"step_ms": ms, "ratio": ms / (1e3 * base), "equal_budget_steps": round(budget * base * 1e3 / ms)}
        print(f"| {path} | {ms:.0f} | {out[path]['ratio']:.2f} | {out[path]['equal_budget_steps']} |")
    return out
