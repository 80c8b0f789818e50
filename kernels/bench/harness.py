"""The one measurement harness: timing, peak memory, the machine's matmul rate, markdown tables.

Every benchmark of the repo (the kernel ops here, the model-level ones in ``train``) measures through these
functions, so that "ms", "peak MiB" and "ratio" mean the same thing in every table:

* time: the median of ``rounds`` calls after ``warmup`` untimed calls, CUDA synchronised; several
  implementations are timed *interleaved* (one call of each in turn), so that load on a shared machine hits
  all of them alike and their ratio stays meaningful; with the allocator as users run it (the memory
  processes' lowered mmap threshold would charge page faults to whichever path allocates most);
* peak memory: measured in a fresh Python process per cell (``in_fresh_process``), above what the inputs
  already hold: on CUDA the allocator's peak, on CPU the peak resident set size (reset through
  ``/proc/self/clear_refs``) with glibc's mmap threshold lowered so that freed buffers leave the RSS;
* the matmul rate: FLOP/s of a large square matmul measured here, printed with every table so a reader can
  tell how fast the machine was (and MFU can be computed against it);
* threads: the fresh processes inherit this one's environment, OpenMP's wait policy included, and every table
  names the policy it ran under (``machine``). OpenMP's default lets an idle thread spin a while before it
  sleeps, which is what users get and what an idle machine should be measured with: under
  ``OMP_WAIT_POLICY=PASSIVE`` every parallel op wakes sleeping threads, which costs the paths made of many small
  ops and not dense SDPA (one op): ``train bench sparse-train --threads 2`` at 4k printed 1.03-1.34x dense's step
  time for the sparse mixers under PASSIVE and 0.88-0.91x under the default, same code, idle machine. On a CPU
  shared with other jobs, export ``OMP_WAIT_POLICY=PASSIVE`` before measuring: there spin-waiting makes every
  parallel op wait for a partner thread the scheduler has put aside (tens of times slower under a load of ~20),
  and the table shows the scheduler, not the code. (``--clock cpu`` goes further: CPU time, not wall.)

This module imports only torch (``kernels`` may not import ``arch`` or ``train``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # every allocation > 64 KiB its own mmap: RSS follows live memory


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: str | torch.device = "cpu",
    *,
    warmup: int = 1,
    rounds: int = 5,
    clock: str = "wall",
) -> dict[str, float]:
    """Median seconds per call of each function, timed interleaved: ``rounds`` rounds of one call of each.

    clock: ``wall`` (elapsed time) or ``cpu`` (CPU time of this process, all its threads: on a CPU shared with
    other jobs, the work done rather than the share of the machine the scheduler gave; with one thread it is
    the wall time of an idle machine; CPU devices only)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    if clock not in CLOCKS or (clock == "cpu" and torch.device(device).type != "cpu"):
        raise ValueError(f"clock must be one of {sorted(CLOCKS)} ('cpu' on CPU devices only), got {clock!r}")
    now = CLOCKS[clock]
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = now()
            fn()
            sync(device)
            times[name].append(now() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def time_call(fn: Callable[[], Any], device: str | torch.device = "cpu", *, warmup: int = 1, rounds: int = 5) -> float:
    """Median seconds of one function (``time_interleaved`` with one entry)."""
    return time_interleaved({"fn": fn}, device, warmup=warmup, rounds=rounds)["fn"]


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Bytes of peak memory of one call of ``fn`` above what is allocated before it, in this process (CUDA: the
    allocator's peak; CPU: the peak RSS, reset through ``/proc/self/clear_refs``). Meaningful on CPU only in a
    process started with ``MALLOC_ENV`` (see ``in_fresh_process``)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    fn()
    return _rss("VmHWM:") - base


class PeakMemory:
    """Peak memory while a ``with`` block runs (for long runs such as training loops): the CUDA allocator's
    peak, or on CPU the resident set size sampled every 2 ms by a thread. ``.peak`` is in bytes."""

    def __init__(self, device: str | torch.device):
        self.device, self.peak = torch.device(device), 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss("VmRSS:"))
            time.sleep(0.002)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def in_fresh_process(target: str, *args: Any, threads: int = 0, for_memory: bool = False) -> Any:
    """Run ``target(*args)`` (``"package.module:function"``, JSON-serialisable arguments and result) in a new
    Python process with ``threads`` torch threads (0: torch's default) and this process's environment, and return
    its result. ``for_memory``: start it with ``MALLOC_ENV``, for ``peak_memory`` only: under that
    allocator every mid-sized buffer is a fresh mapping whose page faults are charged to the code that allocates
    most, so a process that times must not use it."""
    module, fn = target.split(":")
    code = (
        f"import json, torch; torch.set_num_threads({int(threads)} or torch.get_num_threads()); "
        f"from {module} import {fn}; print('@@result ' + json.dumps({fn}(*json.loads({json.dumps(args)!r}))))"
    )
    env = {**os.environ, **(MALLOC_ENV if for_memory else {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("@@result ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{target}{tuple(args)} failed in a fresh process:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("@@result ") :])


def matmul_rate(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a square matmul (n = 4096 on CUDA, 1024 on CPU) on this machine."""
    device = torch.device(device)
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def machine(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, rate: float | None = None) -> str:
    """One line naming the machine a table was measured on: device, threads (CPU: cores, load average, i.e. how
    many jobs shared them, and OpenMP's wait policy), measured matmul rate."""
    device = torch.device(device)
    rate = matmul_rate(device, dtype) if rate is None else rate
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        policy = os.environ.get("OMP_WAIT_POLICY", "default")
        name = (
            f"CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}), {torch.get_num_threads()} threads"
            f" (OpenMP wait policy: {policy})"
        )
    return f"{name}; measured matmul rate {rate / 1e9:.1f} GFLOP/s ({str(dtype).removeprefix('torch.')})"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` has one character per column, ``l`` or ``r`` (default: first left, rest
    right). Floats are printed as given: format them before."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header) or any(len(r) != len(header) for r in rows):
        raise ValueError("markdown_table: every row and `align` need one entry per column")
    lines = ["| " + " | ".join(map(str, header)) + " |"]
    lines.append("|" + "|".join("---" if a == "l" else "---:" for a in align) + "|")
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 2) -> str:
    """A number for a table: ``-`` for a missing value, else ``digits`` significant decimals."""
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"
