"""Where a run writes (run directories) and computes (its device, and whether the model fits its memory); kept
free of heavy imports."""

from __future__ import annotations

import os
import time
from pathlib import Path

RUN_DIR_ENV = "ADAPTIVE_COMPUTE_RUN_DIR"  # shared with the processes that `strategy=ddp` launches


def make_run_dir(cfg: dict) -> Path:
    """Create ``<out_dir>/<name>/<timestamp>`` exclusively (``os.mkdir``, which fails if the folder exists) and
    return it: two runs started in the same second get two folders (``<timestamp>-1``, ...), never one.
    Processes launched by ``strategy=ddp`` inherit the folder of the process that launched them (env)."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    parent = Path(cfg["trainer"]["out_dir"]) / cfg["name"]
    parent.mkdir(parents=True, exist_ok=True)
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
    while True:
        run_dir = parent / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            n += 1


def run_dir_of(target: str | os.PathLike) -> Path:
    """Where a command writes its outputs by default: a run or model directory itself, a checkpoint file's run
    directory (the folder above ``checkpoints/``)."""
    target = Path(target)
    if target.is_dir():
        return target
    return target.parent.parent if target.parent.name == "checkpoints" else target.parent


def device_for(accelerator: str = "auto"):
    """The torch device of a command: CUDA when asked for (``auto``, ``gpu``, ``cuda``) and available, else CPU."""
    import torch

    return torch.device("cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------ memory
def available_memory(device) -> tuple[int, str]:
    """(bytes, where the figure comes from) of memory free for a new process on ``device``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return info["MemAvailable"], "MemAvailable in /proc/meminfo"
    except (OSError, KeyError, ValueError, IndexError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages"


def _saved_activation_bytes(cfg: dict, model, batch: int, probe_len: int) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one training batch, counted during a forward
    pass on the meta device (no memory, no compute) of ``batch`` sequences of ``probe_len`` tokens (LMs) or of
    ``batch`` images (classifiers)."""
    import torch

    from .config import task_of

    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    m = cfg["model"]
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if task_of(cfg) == "classification":
            x = torch.zeros(batch, m["in_chans"], m["image_size"], m["image_size"])
        else:
            x = torch.zeros(batch, probe_len, dtype=torch.long)
        model(x).float().logsumexp(-1).sum()
    return total


def _activation_bytes(cfg: dict, model, probe_len: int) -> int:
    """Saved activations of a training batch: measured at the batch's length up to ``probe_len`` tokens, and
    beyond it extrapolated along the line through the measurements at ``probe_len / 2`` and ``probe_len``
    (weights saved for backward are the same at every length)."""
    B, T = cfg["data"]["batch_size"], cfg["data"].get("seq_len") or 1
    if T <= probe_len:
        return _saved_activation_bytes(cfg, model, B, T)
    half = _saved_activation_bytes(cfg, model, B, probe_len // 2)
    full = _saved_activation_bytes(cfg, model, B, probe_len)
    return full + (full - half) * (T - probe_len) // (probe_len - probe_len // 2)


def estimate_memory(cfg: dict, training: bool = True, probe_len: int = 256) -> dict:
    """A rough memory estimate of the config's model, built on the meta device (nothing allocated):
    parameters (x4 when training: weights, gradients, Adam's two moments; sharded over the devices by fsdp /
    deepspeed), buffers, and when training the activations saved for backward (``_activation_bytes``).
    Returns bytes: {"params", "buffers", "activations", "total", "n_params"}."""
    import torch

    from arch import build_model

    with torch.device("meta"):
        model = build_model(cfg["model"])
    n_params = sum(p.numel() for p in model.parameters())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    activations = 0
    if training:
        tr = cfg["trainer"]
        if any(s in str(tr["strategy"]) for s in ("fsdp", "deepspeed")) and isinstance(tr["devices"], int):
            params = params // max(tr["devices"], 1)
        params *= 4
        activations = _activation_bytes(cfg, model, probe_len)
    return {
        "params": params,
        "buffers": buffers,
        "activations": activations,
        "total": params + buffers + activations,
        "n_params": n_params,
    }


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def fmt_count(n: float) -> str:
    """3_280_000 -> '3.3M'."""
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}T"


def memory_line(cfg: dict, training: bool = True) -> tuple[str, bool]:
    """(a line stating the estimate against the available memory, whether it fits)."""
    est = estimate_memory(cfg, training)
    free, source = available_memory(device_for(cfg["trainer"]["accelerator"]))
    what = "training" if training else "loading"
    parts = f"{fmt_bytes(est['params'])} for {fmt_count(est['n_params'])} parameters" + (
        " (weights, gradients, Adam moments)" if training else ""
    )
    parts += f", {fmt_bytes(est['buffers'])} of buffers"
    if training:
        d = cfg["data"]
        shape = f"{d['batch_size']} x {d.get('seq_len')} tokens" if d.get("seq_len") else f"{d['batch_size']} images"
        parts += f", {fmt_bytes(est['activations'])} of activations at a batch of {shape}"
    line = f"{what} needs about {fmt_bytes(est['total'])} ({parts}); {fmt_bytes(free)} is available ({source})"
    return line, est["total"] <= free


def check_memory(cfg: dict, training: bool = True) -> None:
    """Refuse (``ConfigError``) a model whose estimated memory exceeds what is available, before allocating it."""
    from arch.registry import ConfigError

    line, fits = memory_line(cfg, training)
    if not fits:
        raise ConfigError(f"model: too large for this machine: {line}; make the model or data.batch_size smaller")
