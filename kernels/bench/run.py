"""The benchmark runner: every registered ``Benchmark``, one markdown table each, ratios measured in one run.

For each size, one fresh process times every (implementation, mode) interleaved (``harness.time_interleaved``);
then one fresh process per cell measures its peak memory above its inputs (``harness.peak_memory``). A cell
that fails (out of memory, an implementation missing on this machine) is printed as ``-`` with the reason
below the table; the rest of the run goes on.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

import torch

from . import harness
from .registry import BENCHMARKS, Benchmark


def _bench(module: str, name: str) -> Benchmark:
    importlib.import_module(module)
    return BENCHMARKS[name]


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def time_size(
    module: str,
    name: str,
    size: dict,
    cells: list,
    device: str,
    dtype: str,
    warmup: int,
    rounds: int,
    clock: str = "wall",
):
    """In this process: median seconds of every (impl, mode) cell of one size, interleaved -> ({"impl|mode": s},
    {"impl|mode": error}). A cell whose setup or first (warm-up) call raises is left out with its error, so the
    others are still timed together."""
    bench = _bench(module, name)
    fns, errors = {}, {}
    for impl, mode in cells:
        try:
            fn = bench.setup(size, impl, mode, device, _dtype(dtype))
            fn()  # the first warm-up call
            fns[f"{impl}|{mode}"] = fn
        except Exception as e:  # reported below the table
            errors[f"{impl}|{mode}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    times = harness.time_interleaved(fns, device, warmup=max(warmup - 1, 0), rounds=rounds, clock=clock) if fns else {}
    return times, errors


def memory_cell(module: str, name: str, size: dict, impl: str, mode: str, device: str, dtype: str) -> int:
    """In this process: peak bytes of one call above its inputs, after one warm-up call."""
    bench = _bench(module, name)
    fn = bench.setup(size, impl, mode, device, _dtype(dtype))
    fn()
    return harness.peak_memory(fn, device)


def _fresh(target: str, *args: Any, threads: int) -> tuple[Any, str | None]:
    try:
        memory = target == "memory_cell"
        return harness.in_fresh_process(f"kernels.bench.run:{target}", *args, threads=threads, for_memory=memory), None
    except RuntimeError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        return None, lines[-1][:200] if lines else "failed"


def run_benchmark(
    bench: Benchmark,
    *,
    device: str,
    dtype: str | None = None,
    sizes: list[dict] | None = None,
    impls: list[str] | None = None,
    warmup: int = 1,
    rounds: int = 5,
    memory: bool = True,
    threads: int = 0,
    clock: str = "wall",
) -> dict:
    """Measure one benchmark; print its table; return {"rows": [...], "errors": [...]}."""
    dtype = dtype or bench.dtype(device)
    impls = [i for i in bench.impls if impls is None or i in impls or i in bench.baselines]
    errors: list[str] = []
    runnable = []
    for impl in impls:
        reason = bench.skip(impl, device, dtype) if bench.skip else None
        if reason:
            errors.append(f"{impl}: skipped ({reason})")
        else:
            runnable.append(impl)
    rows = []
    for size in sizes or bench.sizes(device):
        cells = [(i, m) for i in runnable for m in bench.modes]
        result, err = _fresh(
            "time_size", bench.module, bench.name, size, cells, device, dtype, warmup, rounds, clock, threads=threads
        )
        times, failed = result or ({}, {})
        if err:  # the process died (e.g. out of memory): time each cell alone, so that it does not hide the others
            for cell in cells:
                t, e = _fresh(
                    "time_size",
                    bench.module,
                    bench.name,
                    size,
                    [cell],
                    device,
                    dtype,
                    warmup,
                    rounds,
                    clock,
                    threads=threads,
                )
                times.update(t[0] if t else {})
                failed.update(t[1] if t else {f"{cell[0]}|{cell[1]}": e})
        errors += [f"{_label(size)} {cell.replace('|', ' ')}: {e}" for cell, e in failed.items()]
        for impl in runnable:
            row = {"size": size, "impl": impl, "ms": {}, "peak_mib": {}, "flops_per_s": {}}
            for mode in bench.modes:
                s = times.get(f"{impl}|{mode}")
                row["ms"][mode] = None if s is None else 1e3 * s
                flops = bench.flops(size, impl, mode) if s is not None and bench.flops else None
                if flops is not None:  # None: a cell without arithmetic to rate (e.g. building metadata)
                    row["flops_per_s"][mode] = flops / s
                if memory and s is not None:
                    b, e = _fresh(
                        "memory_cell", bench.module, bench.name, size, impl, mode, device, dtype, threads=threads
                    )
                    row["peak_mib"][mode] = None if b is None else b / 2**20
                    if e:
                        errors.append(f"{_label(size)} {impl} {mode} memory: {e}")
            rows.append(row)
    print(format_table(bench, rows, memory))
    for e in errors:
        print(f"  - {e}")
    print(flush=True)
    return {"name": bench.name, "device": device, "dtype": dtype, "rows": rows, "errors": errors}


def _label(size: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def format_table(bench: Benchmark, rows: list[dict], memory: bool = True) -> str:
    """The markdown table of one benchmark: per mode ms, rate and peak MiB; then, per baseline, this row's time
    and memory divided by the baseline's at the same size (below 1: faster / smaller)."""
    keys = list(rows[0]["size"]) if rows else []
    header = [*keys, "impl"]
    for mode in bench.modes:
        header += [f"{mode} ms"] + ([f"{mode} {bench.flops_label}"] if bench.flops else [])
        header += [f"{mode} peak MiB"] if memory else []
    modes = "/".join(bench.modes)
    for b in bench.baselines:
        header += [f"time ÷ {b} ({modes})"] + ([f"memory ÷ {b} ({modes})"] if memory else [])
    table = []
    for row in rows:
        line = [*(row["size"][k] for k in keys), row["impl"]]
        for mode in bench.modes:
            line.append(harness.fmt(row["ms"][mode]))
            rate = row["flops_per_s"].get(mode)
            line += [harness.fmt(None if rate is None else rate / 1e12, 3)] if bench.flops else []
            line += [harness.fmt(row["peak_mib"].get(mode), 1)] if memory else []
        for b in bench.baselines:
            ref = next((r for r in rows if r["impl"] == b and r["size"] == row["size"]), None)
            for what in ("ms", "peak_mib") if memory else ("ms",):
                ratios = [_ratio(row[what].get(m), ref[what].get(m) if ref else None) for m in bench.modes]
                line.append(" / ".join(harness.fmt(x) for x in ratios))
        table.append(line)
    align = "r" * len(keys) + "l" + "r" * (len(header) - len(keys) - 1)
    return f"### {bench.name}: {bench.description}\n\n" + harness.markdown_table(header, table, align)


def parse_size(text: str) -> dict:
    """``"T=8192,density=0.125"`` -> {"T": 8192, "density": 0.125} (ints, floats, else strings)."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"--size {text!r}: expected key=value[,key=value...]")
        for cast in (int, float, str):
            try:
                out[key.strip()] = cast(value)
                break
            except ValueError:
                continue
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    parser.add_argument("--impl", action="append", help="only these implementations (and the baselines); repeatable")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: each benchmark's")
    parser.add_argument("--size", action="append", type=parse_size, help="a size instead of the defaults, e.g. T=8192")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="wall time, or CPU time of the process (shared CPUs)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to this JSON file")


def run(names: list[str], args: argparse.Namespace) -> list[dict]:
    """Run the named benchmarks (all registered ones when empty) with the options of ``add_arguments``."""
    if args.rounds < 1 or args.warmup < 0 or args.threads < 0:
        raise SystemExit("error: --rounds must be >= 1, --warmup >= 0, --threads >= 0")
    if args.list:
        for name, b in sorted(BENCHMARKS.items()):
            print(f"{name:24s} {b.description}  [impls: {', '.join(b.impls)}]")
        return []
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"error: unknown benchmark {unknown[0]!r}; registered: {', '.join(sorted(BENCHMARKS))}")
    dtype = _dtype(args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    with _threads(args.threads):
        print(f"machine: {harness.machine(args.device, dtype)}; clock: {args.clock} time\n", flush=True)
    results = [
        run_benchmark(
            BENCHMARKS[n],
            device=args.device,
            dtype=args.dtype,
            sizes=args.size,
            impls=args.impl,
            warmup=args.warmup,
            rounds=args.rounds,
            memory=not args.no_memory,
            threads=args.threads,
            clock=args.clock,
        )
        for n in names or sorted(BENCHMARKS)
    ]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


class _threads:
    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
