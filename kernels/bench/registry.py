"""The benchmark registry: one ``Benchmark`` per measured operation, run by ``kernels.bench.run``.

A benchmark is a grid of sizes × implementations × modes. ``setup(size, impl, mode, device, dtype)`` builds the
inputs and returns a zero-argument callable that performs one call (e.g. a forward, or a forward + backward);
the runner times the implementations of one size interleaved in one process and measures each cell's peak
memory in a fresh process, then prints one markdown table with the ratio of every implementation to each
baseline. Kernel ops register in ``kernels/bench/``; model-level benchmarks (``train``) register the same way.

``setup`` must be a module-level function: the fresh processes import its module to find the benchmark.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Setup = Callable[[dict, str, str, str, Any], Callable[[], Any]]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    setup: Setup  # (size, impl, mode, device, dtype) -> one call
    sizes: Callable[[str], list[dict]]  # device type -> default sizes (dicts of setup parameters)
    impls: tuple[str, ...]  # implementations, ours first
    baselines: tuple[str, ...] = ()  # the implementations every other one is compared with
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    flops: Callable[[dict, str, str], float | None] | None = None  # (size, impl, mode) -> FLOPs of one call
    flops_label: str = "TFLOP/s"  # what `flops` counts, e.g. "dense-equivalent TFLOP/s"
    skip: Callable[[str, str, str], str | None] | None = None  # (impl, device, dtype) -> reason to skip, or None
    dtype: Callable[[str], str] = lambda device: "bfloat16" if device == "cuda" else "float32"

    @property
    def module(self) -> str:
        return self.setup.__module__


BENCHMARKS: dict[str, Benchmark] = {}


def register(bench: Benchmark) -> Benchmark:
    if bench.name in BENCHMARKS and BENCHMARKS[bench.name].module != bench.module:
        raise KeyError(f"benchmark {bench.name!r} is registered twice")
    bad = [b for b in bench.baselines if b not in bench.impls]
    if bad:
        raise ValueError(f"benchmark {bench.name!r}: baselines {bad} are not among its impls {bench.impls}")
    BENCHMARKS[bench.name] = bench
    return bench
