"""``python -m train bench <config>``: the same model trained by the Lightning loop and by a bare PyTorch loop.

One table: tokens/s, step time, model FLOPs utilisation (against the matmul rate measured in the same run),
and peak memory for each loop, and their ratio (the framework's overhead). Both loops use the same model
init, batches, optimizer, schedule, clipping and precision; the Lightning loop logs as ``fit`` does but
writes no checkpoint and runs no validation.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import time
from pathlib import Path

import lightning as L
import torch

from .config import load_config
from .data import LMDataModule, TrainWindows
from .info import forward_flops_per_token
from .module import LMModule, build_optimizer, lm_loss


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak on GPU, else resident set size sampled from /proc."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured FLOP/s of a square matmul on this machine (the MFU denominator)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1 = warmup, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.t0 is None and trainer.global_step == self.warmup:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(cfg: dict, data: LMDataModule, device: torch.device, steps: int, warmup: int) -> float:
    """Plain PyTorch training loop; returns seconds for the ``steps`` timed steps."""
    L.seed_everything(cfg["seed"], verbose=False)
    module = LMModule(cfg, data.bytes_per_token).to(device)
    model = torch.compile(module.model) if cfg["trainer"]["compile"] else module.model
    opt, sched = build_optimizer(module.model, cfg)
    accum, clip = cfg["trainer"]["accumulate_grad_batches"], cfg["optim"]["grad_clip"]
    ds = TrainWindows(
        data.splits["train"]["tokens"],
        cfg["data"]["seq_len"],
        cfg["data"]["batch_size"],
        cfg["seed"],
        0,
        (warmup + steps) * accum,
    )
    bf16 = cfg["trainer"]["precision"] == "bf16-mixed"
    t0 = None
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            t0 = time.perf_counter()
        for micro in range(accum):
            batch = ds[step * accum + micro].to(device)
            with torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = lm_loss(model, batch) / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(module.model.parameters(), clip if clip > 0 else float("inf"))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - t0


def lightning_loop(cfg: dict, data: LMDataModule, steps: int, warmup: int) -> float:
    from .fit import build_trainer

    L.seed_everything(cfg["seed"], verbose=False)
    cfg = {**cfg, "trainer": {**cfg["trainer"], "max_steps": warmup + steps, "val_every": 10**9, "ckpt_every": 10**9}}
    data.cfg = cfg
    module = LMModule(cfg, data.bytes_per_token)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, Path(tmp), callbacks=[timer])
        trainer.fit(module, data)
    return timer.t1 - timer.t0


def bench(config_path: str, overrides=(), steps: int = 40, warmup: int = 5) -> dict:
    cfg = load_config(config_path, overrides)
    cfg["trainer"]["devices"] = 1  # one process: the comparison is per device
    accel = cfg["trainer"]["accelerator"]
    device = torch.device("cuda" if (accel in ("auto", "gpu", "cuda") and torch.cuda.is_available()) else "cpu")
    data = LMDataModule(cfg)
    data.setup()
    tokens_per_step = cfg["data"]["batch_size"] * cfg["data"]["seq_len"] * cfg["trainer"]["accumulate_grad_batches"]
    flops_per_token = 3 * forward_flops_per_token(cfg["model"], cfg["data"]["seq_len"])
    dtype = torch.bfloat16 if "bf16" in cfg["trainer"]["precision"] else torch.float32
    peak_rate = matmul_rate(device, dtype)
    print(
        f"bench {cfg['name']} on {device}: {steps} timed steps after {warmup} warm-up steps, "
        f"{tokens_per_step} tokens/step, {flops_per_token / 1e6:.1f} MFLOP/token (fwd+bwd)"
    )
    rows = {}
    for name, run in (
        ("bare PyTorch", lambda: bare_loop(cfg, data, device, steps, warmup)),
        ("Lightning", lambda: lightning_loop(cfg, data, steps, warmup)),
    ):
        with PeakMemory(device) as mem:
            seconds = run()
        tps = steps * tokens_per_step / seconds
        rows[name] = {
            "tokens_per_s": tps,
            "step_ms": 1e3 * seconds / steps,
            "mfu": tps * flops_per_token / peak_rate,
            "peak_mib": mem.peak / 2**20,
        }
    mem_label = "peak alloc (MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    print(f"\n| loop         | tokens/s | step time (ms) |  MFU   | {mem_label} |")
    print("|--------------|---------:|---------------:|-------:|" + "-" * (len(mem_label) + 1) + ":|")
    for name, r in rows.items():
        print(
            f"| {name:<12} | {r['tokens_per_s']:8.0f} | {r['step_ms']:14.1f} | {100 * r['mfu']:5.1f}% | "
            f"{r['peak_mib']:{len(mem_label)}.0f} |"
        )
    ratio = rows["Lightning"]["tokens_per_s"] / rows["bare PyTorch"]["tokens_per_s"]
    print(
        f"\nLightning / bare tokens/s = {ratio:.3f}  (matmul rate measured here: {peak_rate / 1e9:.1f} GFLOP/s "
        f"{str(dtype).removeprefix('torch.')}; MFU counts matmul FLOPs, attention as the full TxT product)"
    )
    return {"rows": rows, "ratio": ratio, "matmul_flops": peak_rate}
