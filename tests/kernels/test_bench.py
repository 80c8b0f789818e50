"""The benchmark harness and runner: ratios, memory and failures are reported as measured."""

from __future__ import annotations

import argparse
import time

import pytest
import torch

from kernels.bench import harness, run
from kernels.bench.registry import BENCHMARKS, Benchmark, register

SLEEP = {"fast": 0.05, "slow": 0.2}  # seconds per call
ALLOC = {"fast": 8, "slow": 64}  # MiB allocated (and touched) per call


def setup(size: dict, impl: str, mode: str, device: str, dtype: torch.dtype):
    if impl == "broken":
        raise RuntimeError("this implementation is broken on purpose")

    def call():
        x = torch.ones(ALLOC[impl] * 2**20 // 4)  # float32: touched, so it is resident
        time.sleep(SLEEP[impl])
        return x.sum()

    return call


register(
    Benchmark(
        name="test-fake",
        description="a fake benchmark with known time and memory ratios",
        setup=setup,
        sizes=lambda device: [{"n": 1}],
        impls=("slow", "broken", "fast"),
        baselines=("fast",),
        modes=("call",),
    )
)


def test_runner_reports_measured_ratios_and_failing_cells(capsys):
    result = run.run_benchmark(BENCHMARKS["test-fake"], device="cpu", rounds=3, warmup=1)
    rows = {r["impl"]: r for r in result["rows"]}
    slow, fast = rows["slow"], rows["fast"]
    assert 2.5 < slow["ms"]["call"] / fast["ms"]["call"] < 8.0  # 200 ms vs 50 ms, plus load on a shared machine
    assert 4.0 < slow["peak_mib"]["call"] / fast["peak_mib"]["call"] < 12.0  # 64 MiB vs 8 MiB
    assert rows["broken"]["ms"]["call"] is None
    out = capsys.readouterr().out
    assert "broken on purpose" in out
    line = next(x for x in out.splitlines() if x.startswith("| 1 | slow"))
    ratio = float(line.split("|")[-3])  # "time ÷ fast" column
    assert ratio == pytest.approx(slow["ms"]["call"] / fast["ms"]["call"], rel=0.02)


def test_time_interleaved_median_and_markdown_table():
    calls = []
    t = harness.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
    assert calls == ["a", "b"] * 4 and set(t) == {"a", "b"}  # one warm-up round, then interleaved rounds
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        harness.time_interleaved({"a": lambda: None}, rounds=0)
    table = harness.markdown_table(["x", "y"], [["a", "1.00"]])
    assert table.splitlines() == ["| x | y |", "|---|---:|", "| a | 1.00 |"]
    with pytest.raises(ValueError, match="one entry per column"):
        harness.markdown_table(["x", "y"], [["a"]])


def test_parse_size_and_unknown_benchmark():
    assert run.parse_size("T=8192,density=0.125,impl=x") == {"T": 8192, "density": 0.125, "impl": "x"}
    with pytest.raises(argparse.ArgumentTypeError, match="key=value"):
        run.parse_size("T8192")
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    with pytest.raises(SystemExit, match="unknown benchmark 'nope'"):
        run.run(["nope"], parser.parse_args([]))


def test_cpu_clock_counts_work_not_waiting():
    """clock="cpu" counts this process's CPU time: a call that sleeps 0.1 s costs ~0 of it, one that computes
    costs about its wall time (one thread); the wall clock sees both."""
    x = torch.randn(256, 256)

    def work():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            x @ x

    fns = {"sleep": lambda: time.sleep(0.1), "work": work}
    wall = harness.time_interleaved(fns, rounds=2, clock="wall")
    cpu = harness.time_interleaved(fns, rounds=2, clock="cpu")
    assert wall["sleep"] >= 0.1 and wall["work"] >= 0.1
    assert cpu["sleep"] < 0.02 and cpu["work"] > 0.02  # busy, even if the machine gave this process a fifth
    with pytest.raises(ValueError, match="clock must be one of"):
        harness.time_interleaved(fns, rounds=1, clock="gpu")


def test_only_memory_processes_lower_the_mmap_threshold(monkeypatch):
    # A timing process under MALLOC_ENV charges page faults to whichever path allocates most (measured: the
    # block-sparse core's forward at 8k took 1.85x its time in a normal process), so only memory processes get it.
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's environment reaches the fresh process
    assert harness.in_fresh_process("os:getenv", "MALLOC_MMAP_THRESHOLD_", threads=1) is None
    assert harness.in_fresh_process("os:getenv", "MALLOC_MMAP_THRESHOLD_", threads=1, for_memory=True) == "65536"
    assert harness.in_fresh_process("os:getenv", "OMP_WAIT_POLICY", threads=1) == "PASSIVE"
    assert "OpenMP wait policy: PASSIVE" in harness.machine(rate=1e9)
