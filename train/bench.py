"""Training throughput of configs, and every registered benchmark (kernel ops and studies), as markdown tables.

    python -m train bench configs/lm/gpt-tiny.yaml [dotted.key=value ...] [--steps N]
    python -m train bench configs/lm/gpt-tiny.yaml configs/lm/<other>.yaml [--steps N]
    python -m train bench NAME [NAME ...] [--size key=value,...] [--impl ...]     (--list shows the names)

One config: the same model trained by the Lightning loop and by a bare PyTorch loop (same init, batches,
optimizer, schedule, clipping and precision): tokens/s, step time, model FLOPs utilisation against the matmul
rate measured in the same run, peak memory, and their ratio (the framework's overhead). Several configs: their
training-step times measured interleaved on the same batches, and each one's steps at the first one's budget.
A name: a benchmark registered with ``kernels.bench`` (by ``kernels`` or a study), run by its runner.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kernels.bench import KERNEL_BENCHMARKS
from kernels.bench import run as runner
from kernels.bench.harness import PeakMemory, fmt, machine, markdown_table, matmul_rate, sync

from .runs import device_for


def register_all() -> None:
    """Import every module that registers benchmarks: the kernel ops' and every study's."""
    from .studies import discover as studies

    for module in (*KERNEL_BENCHMARKS, *(m for s in studies() for m in s.BENCHMARKS)):
        importlib.import_module(module)


def train_windows(cfg: dict, data, n_batches: int):
    """The first ``n_batches`` micro-batches of a run of ``cfg`` (``fit``'s batches, in order)."""
    from .data import TrainWindows

    d = cfg["data"]
    return TrainWindows(data.splits["train"]["tokens"], d["seq_len"], d["batch_size"], cfg["seed"], 0, n_batches)


def bare_steps(cfg: dict, model: torch.nn.Module, opt, sched, batches, device: torch.device):
    """A bare PyTorch training loop over ``batches`` (micro-batches, accumulated as ``fit`` does); yields after
    every optimizer step."""
    from .module import lm_loss

    accum, clip = cfg["trainer"]["accumulate_grad_batches"], cfg["optim"]["grad_clip"]
    bf16 = cfg["trainer"]["precision"] == "bf16-mixed"
    fwd = torch.compile(model) if cfg["trainer"]["compile"] else model
    for step in range(len(batches) // accum):
        for micro in range(accum):
            batch = batches[step * accum + micro].to(device)
            with torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = lm_loss(fwd, batch) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        yield step


def bare_loop(cfg: dict, data, device: torch.device, steps: int, warmup: int) -> float:
    """Seconds of ``steps`` bare-loop steps after ``warmup`` untimed ones."""
    import lightning as L

    from .module import LMModule, build_optimizer

    L.seed_everything(cfg["seed"], verbose=False)
    module = LMModule(cfg, data.bytes_per_token).to(device)
    opt, sched = build_optimizer(module.model, cfg)
    batches = train_windows(cfg, data, (warmup + steps) * cfg["trainer"]["accumulate_grad_batches"])
    t0 = time.perf_counter()
    for step in bare_steps(cfg, module.model, opt, sched, batches, device):
        if step == warmup - 1:  # the warm-up steps are done: time from here
            sync(device)
            t0 = time.perf_counter()
    sync(device)
    return time.perf_counter() - t0


def lightning_loop(cfg: dict, data, steps: int, warmup: int) -> float:
    """Seconds of ``steps`` steps of ``fit``'s Lightning loop after ``warmup`` untimed ones (no checkpoint or
    validation)."""
    import lightning as L

    from .module import LMModule
    from .trainer import build_trainer

    class StepTimer(L.Callback):
        t0 = t1 = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.t0 is None and trainer.global_step == warmup:
                self.t0 = time.perf_counter()
            self.t1 = time.perf_counter()

    L.seed_everything(cfg["seed"], verbose=False)
    cfg = {**cfg, "trainer": {**cfg["trainer"], "max_steps": warmup + steps, "val_every": 10**9, "ckpt_every": 10**9}}
    data.cfg = cfg
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        build_trainer(cfg, Path(tmp), callbacks=[timer]).fit(LMModule(cfg, data.bytes_per_token), data)
    return timer.t1 - timer.t0


def bench_loops(config_path: str, overrides=(), steps: int = 40, warmup: int = 5) -> dict:
    """The Lightning loop against the bare loop on one config (see the module docstring)."""
    from .config import load_config
    from .datamodules import LMDataModule
    from .info import forward_flops_per_token

    cfg = load_config(config_path, overrides)
    cfg["trainer"]["devices"] = 1  # one process: the comparison is per device
    device = device_for(cfg["trainer"]["accelerator"])
    data = LMDataModule(cfg)
    data.setup()
    d, tr = cfg["data"], cfg["trainer"]
    tokens_per_step = d["batch_size"] * d["seq_len"] * tr["accumulate_grad_batches"]
    flops_per_token = 3 * forward_flops_per_token(cfg["model"], d["seq_len"])
    dtype = torch.bfloat16 if "bf16" in tr["precision"] else torch.float32
    rate = matmul_rate(device, dtype)
    print(f"bench {cfg['name']}: {steps} timed steps after {warmup} warm-up steps, {tokens_per_step} tokens/step,")
    print(f"  {flops_per_token / 1e6:.1f} MFLOP/token (fwd+bwd); machine: {machine(device, dtype, rate)}\n")
    rows = {}
    for name, loop in (
        ("bare PyTorch", lambda: bare_loop(cfg, data, device, steps, warmup)),
        ("Lightning", lambda: lightning_loop(cfg, data, steps, warmup)),
    ):
        with PeakMemory(device) as mem:
            seconds = loop()
        tps = steps * tokens_per_step / seconds
        rows[name] = {"tokens_per_s": tps, "step_ms": 1e3 * seconds / steps, "mfu": tps * flops_per_token / rate}
        rows[name]["peak_mib"] = mem.peak / 2**20
    mem_label = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    table = [
        [n, f"{r['tokens_per_s']:.0f}", fmt(r["step_ms"], 1), f"{100 * r['mfu']:.1f}%", f"{r['peak_mib']:.0f}"]
        for n, r in rows.items()
    ]
    print(markdown_table(["loop", "tokens/s", "step ms", "MFU", mem_label], table))
    ratio = rows["Lightning"]["tokens_per_s"] / rows["bare PyTorch"]["tokens_per_s"]
    print(f"\nLightning / bare tokens/s = {ratio:.3f}  (MFU counts matmul FLOPs, attention as the full TxT product)")
    return {"rows": rows, "ratio": ratio, "matmul_flops": rate}


def step_times(config_paths: list[str], overrides=(), steps: int = 8) -> dict:
    """Training-step time of several LM configs, interleaved (one step of each in turn, the first config's
    batches), so that load on the machine affects all alike; each model's steps at the first one's budget."""
    import lightning as L

    from arch import build_model

    from .config import load_config
    from .datamodules import LMDataModule
    from .module import build_optimizer

    cfgs = [load_config(p, overrides) for p in config_paths]
    data = LMDataModule(cfgs[0])
    data.setup()
    batches = train_windows(cfgs[0], data, steps + 1)
    loops, times = [], [[] for _ in cfgs]
    for cfg in cfgs:
        L.seed_everything(cfg["seed"], verbose=False)
        model = build_model(cfg["model"])
        cfg = {**cfg, "trainer": {**cfg["trainer"], "accumulate_grad_batches": 1, "compile": False}}
        loops.append(bare_steps(cfg, model, *build_optimizer(model, cfg), batches, torch.device("cpu")))
    for step in range(steps + 1):  # step 0: warm-up, untimed
        for loop, t in zip(loops, times):
            t0 = time.perf_counter()
            next(loop)
            if step:
                t.append(time.perf_counter() - t0)
    base, budget, c = statistics.median(times[0]), cfgs[0]["trainer"]["max_steps"], cfgs[0]["data"]
    print(f"LM training step time, interleaved, median of {steps} steps (batch {c['batch_size']}x{c['seq_len']});")
    print(f"  machine: {machine()}\n")
    out, table = {}, []
    for path, t in zip(config_paths, times):
        ms = 1e3 * statistics.median(t)
        out[path] = {"step_ms": ms, "ratio": ms / (1e3 * base), "equal_budget_steps": round(budget * base * 1e3 / ms)}
        table.append([path, f"{ms:.0f}", f"{out[path]['ratio']:.2f}", out[path]["equal_budget_steps"]])
    print(markdown_table(["config", "step ms", "ratio", f"steps in {config_paths[0]}'s budget ({budget})"], table))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", help="config YAMLs and their dotted.key=value overrides, or benchmark names")
    p.add_argument("--steps", type=int, default=40, help="configs: timed training steps")
    runner.add_arguments(p)  # its --warmup is also the untimed training steps before timing one config
    p.set_defaults(warmup=None)


def run(args: argparse.Namespace) -> None:
    targets = [*args.targets, *args.overrides]
    configs = [t for t in targets if t.endswith((".yaml", ".yml"))]
    overrides = [t for t in targets if "=" in t]
    names = [t for t in targets if t not in configs and t not in overrides]
    if args.steps < 2:
        from arch.registry import ConfigError

        raise ConfigError(f"--steps: {args.steps} is not allowed; allowed values: an integer >= 2")
    if len(configs) == 1:
        bench_loops(configs[0], overrides, args.steps, 5 if args.warmup is None else args.warmup)
    elif configs:
        step_times(configs, overrides, args.steps)
    if names or args.list or not configs:
        register_all()
        runner.run(names, argparse.Namespace(**{**vars(args), "warmup": 1 if args.warmup is None else args.warmup}))
