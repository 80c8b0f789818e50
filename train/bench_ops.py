"""Op-level benchmarks: ``python -m train.bench_ops pattention [--device cuda] [--dtype bf16]``.

Each benchmark prints one markdown table: ours vs a baseline, forward+backward time and activation memory,
and their ratio, all measured in the same run. Activation memory = bytes of the tensors autograd saves for
backward (unique storages), which is what a training step holds per layer; on CUDA the allocator's peak above
the inputs is printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the unique storages autograd saves while running ``fn`` (the activation memory of a step)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, reps: int) -> tuple[float, int]:
    """Median seconds of forward+backward, and the CUDA allocator peak above the start (0 on CPU)."""
    cuda = x.device.type == "cuda"

    def step():
        module(x).float().square().mean().backward()

    for _ in range(2):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return statistics.median(times), peak


def bench_pattention(device: torch.device, dtype: torch.dtype, reps: int) -> None:
    """Pattention FFN (n parameter tokens) vs a GELU MLP with d_ff = n: the same 2·n·d parameters."""
    from arch.pattention import Pattention

    d = 1024 if device.type == "cuda" else 256
    tokens_list = [8192, 32768] if device.type == "cuda" else [1024, 4096]
    ns = [1024, 4096, 16384] if device.type == "cuda" else [256, 1024, 4096]
    print(
        f"Pattention FFN vs GELU MLP of the same parameter count (d_model {d}, {device}, {str(dtype)[6:]}), "
        f"forward+backward, median of {reps}"
    )
    print("| tokens | n = d_ff | pattention ms | mlp ms | time ratio | pattention act MiB | mlp act MiB | mem ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for tokens in tokens_list:
        for n in ns:
            torch.manual_seed(0)
            pat = Pattention(d, d, n, value_std=0.02).to(device, dtype)
            mlp = nn.Sequential(nn.Linear(d, n, bias=False), nn.GELU(), nn.Linear(n, d, bias=False)).to(device, dtype)
            x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
            t_p, _ = time_fwd_bwd(pat, x, reps)
            t_m, _ = time_fwd_bwd(mlp, x, reps)
            m_p = saved_bytes(lambda pat=pat, x=x: pat(x)) / 2**20
            m_m = saved_bytes(lambda mlp=mlp, x=x: mlp(x)) / 2**20
            print(
                f"| {tokens} | {n} | {1e3 * t_p:.2f} | {1e3 * t_m:.2f} | {t_p / t_m:.2f} | {m_p:.1f} | {m_m:.1f} | "
                f"{m_p / m_m:.2f} |"
            )


BENCHMARKS = {"pattention": bench_pattention}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.bench_ops", description=__doc__)
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    BENCHMARKS[a.name](device, dtype, a.reps)


if __name__ == "__main__":
    main()
