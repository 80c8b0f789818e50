"""Every registered benchmark's setup builds and runs one call at a tiny size (the runner measures them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kernels.bench.registry import BENCHMARKS
from train.bench import register_all

register_all()

TINY = {
    "block_sparse": {"T": 200, "H": 4, "Hkv": 2, "hd": 16, "block": 32, "selected": 3},
    "bra-2d": {"batch": 1},
    "bra-1d": {"T": 256, "region": 32, "topk": 2, "query_block": 1},
    "dhsa-prefill": {"T": 256, "budget": 64, "chunk": 16, "query_block": 32},
    "duo-ffn": {"d_model": 32, "tokens": 64},
    "duo-oracle": {"layers": 2, "d_model": 16, "batch": 1, "seq_len": 16},
    "pattention": {"tokens": 64, "d": 16, "n": 32},
    "routed_ffn": {"tokens": 64, "D": 16, "d_ff": 64, "p_big": 0.25},
    "sparse-train": {"T": 256, "region": 32, "topk": 2, "budget": 64, "chunk": 16},
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_benchmark_cells_run(name):
    bench = BENCHMARKS[name]
    for impl in bench.impls:
        if bench.skip and bench.skip(impl, "cpu", "float32"):
            continue
        if name == "block_sparse" and impl == "flex":
            continue  # compiles with the C++ toolchain: minutes on this machine; run by the benchmark itself
        for mode in bench.modes:
            bench.setup(TINY[name], impl, mode, "cpu", torch.float32)()


def test_every_study_benchmark_has_a_tiny_size():
    assert set(TINY) >= set(BENCHMARKS) - {"test-fake"}


def test_bench_list_names_every_benchmark():
    out = subprocess.run([sys.executable, "-m", "train", "bench", "--list"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in TINY:
        assert name in out.stdout
