"""``python -m train.bench_duo``: does compute follow the route? Two tables, each a ratio measured in one run.

(a) One ``DuoFFN`` layer (big = 4d SwiGLU, small = big / 16), forward + backward, with exactly 0, 25, 50, 75 and
    100 % of the tokens forced BIG and the rest SMALL; time relative to all-big. Measurements are interleaved
    (every fraction once per round, median over rounds), so machine load hits all rows alike.
(b) The routing oracle at L layers over the full 2^L small/big route space: the prefix-sharing route tree
    (``train.oracle.route_losses``) against one full forward pass per route (``route_losses_naive``), same batch;
    it also checks that both give the same per-token losses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import arch
from arch.config import LayerContext
from arch.duo import BIG, SMALL, DuoFFN

from .oracle import route_losses, route_losses_naive, route_space


def ffn_times(d_model: int, n_tokens: int, rounds: int, fractions=(0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[float, float]:
    """Median seconds of forward + backward of one DuoFFN layer per fraction of tokens routed BIG."""
    ctx = LayerContext(
        d_model=d_model,
        n_heads=1,
        n_kv_heads=1,
        max_seq_len=n_tokens,
        n_layers=1,
        layer_idx=0,
        proj={"type": "linear"},
        norm={"type": "rmsnorm"},
        rope_theta=1e4,
        rope_fraction=1.0,
        init_std=0.02,
    )
    torch.manual_seed(0)
    layer = DuoFFN(ctx, d_ff=4 * d_model, small_ratio=16)
    x = torch.randn(1, n_tokens, d_model, requires_grad=True)  # [B, T, D]
    g = torch.Generator().manual_seed(0)
    routes = {}
    for f in fractions:
        route = torch.full((1, n_tokens), SMALL)
        route[0, torch.randperm(n_tokens, generator=g)[: round(f * n_tokens)]] = BIG
        routes[f] = route

    def step(f: float) -> float:
        t0 = time.perf_counter()
        layer(x, route=routes[f]).sum().backward()
        return time.perf_counter() - t0

    for f in fractions:  # warm-up
        step(f)
    times = {f: [] for f in fractions}
    for _ in range(rounds):
        for f in fractions:
            times[f].append(step(f))
    return {f: statistics.median(t) for f, t in times.items()}


def oracle_times(n_layers: int, d_model: int, batch: int, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = arch.build_model(
        {
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": 4,
            "max_seq_len": seq_len,
            "ffn": {"type": "duo", "d_ff": 4 * d_model},
        }
    ).eval()
    ids = torch.randint(0, 256, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    routes = route_space(n_layers)
    best = {"tree": float("inf"), "naive": float("inf")}
    for _ in range(repeats):  # interleaved, best of `repeats`
        for name, fn in (("tree", route_losses), ("naive", route_losses_naive)):
            t0 = time.perf_counter()
            out = fn(model, ids, routes)
            best[name] = min(best[name], time.perf_counter() - t0)
            if name == "tree":
                tree = out
    diff = (tree - out).abs().max().item()
    return {**best, "routes": len(routes), "max_abs_diff": diff}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m train.bench_duo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-model", type=int, default=512, help="(a) layer width; big d_ff = 4 d, small = d / 4")
    p.add_argument("--tokens", type=int, default=4096, help="(a) tokens per forward")
    p.add_argument("--rounds", type=int, default=15, help="(a) timed rounds (median)")
    p.add_argument("--layers", type=int, default=8, help="(b) oracle model depth L (2^L routes)")
    p.add_argument("--oracle-d-model", type=int, default=128)
    p.add_argument("--oracle-batch", type=int, default=2)
    p.add_argument("--oracle-seq-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="(b) timed repeats (best of)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); on a "
        "machine shared with other jobs, 1 avoids spinning thread barriers between small ops",
    )
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"bench_duo on cpu, {torch.get_num_threads()} threads")
    t = ffn_times(a.d_model, a.tokens, a.rounds)
    print(
        f"\n(a) DuoFFN hard routing, forward+backward, d {a.d_model}, big d_ff {4 * a.d_model}, small d_ff "
        f"{a.d_model // 4}, {a.tokens} tokens, median of {a.rounds} interleaved rounds\n"
    )
    print("| tokens routed big | time (ms) | / all-big |\n|---:|---:|---:|")
    for f, s in t.items():
        print(f"| {100 * f:.0f}% | {1e3 * s:.2f} | {s / t[1.0]:.3f} |")
    o = oracle_times(a.layers, a.oracle_d_model, a.oracle_batch, a.oracle_seq_len, a.repeats)
    print(
        f"\n(b) oracle over all {o['routes']} small/big routes, L = {a.layers}, d {a.oracle_d_model}, batch "
        f"{a.oracle_batch}x{a.oracle_seq_len} tokens, best of {a.repeats}\n"
    )
    print("| evaluator | time (s) | speed-up |\n|---|---:|---:|")
    print(f"| naive: one full pass per route | {o['naive']:.2f} | 1.00 |")
    print(f"| prefix-sharing route tree | {o['tree']:.2f} | {o['naive'] / o['tree']:.2f} |")
    print(f"\nper-token losses of the two evaluators: max |difference| = {o['max_abs_diff']:.2e}")
    return {"ffn": t, "oracle": o}


if __name__ == "__main__":
    main()
