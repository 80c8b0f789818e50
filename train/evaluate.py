"""Loss and bits per byte of a trained model on the whole held-out split.

    python -m train eval <checkpoint | run dir | model dir> [dotted.key=value ...]

Overrides apply to the saved config, e.g. another ``model.mixer`` evaluates the same weights with another
attention. ``mean_loss`` is the one evaluation loop of the repo (also used by the long-context study).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .cli import add_target


@torch.no_grad()
def mean_loss(model, batches: Iterable[torch.Tensor], device="cpu", progress: str | None = None) -> dict:
    """Token-weighted mean next-token cross-entropy (nats) of ``model`` over ``batches`` (LongTensors
    [b, T + 1]) -> {"loss", "tokens"}; ``progress``: a tqdm description, or None for no bar."""
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        batch = batch.to(device=device, dtype=torch.long)  # [b, T + 1]
        logits = model(batch[:, :-1])  # [b, T, V]
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return {"loss": total / count, "tokens": count}


def evaluate_model(model, data, progress: bool = True) -> dict:
    """``mean_loss`` over every validation window of an ``LMDataModule`` -> {"loss", "bpb", "ppl", "tokens"}."""
    from .data import bits_per_byte

    r = mean_loss(model, data.val_dataloader(), next(model.parameters()).device, "eval" if progress else None)
    return {**r, "bpb": bits_per_byte(r["loss"], data.bytes_per_token), "ppl": math.exp(r["loss"])}


def evaluate(target: str, overrides=()) -> dict:
    """Evaluate on the whole held-out split; a non-finite loss (diverged weights) raises ``NonFiniteLossError``."""
    from .checkpoint import load_trained
    from .datamodules import LMDataModule
    from .errors import NonFiniteLossError

    cfg, model = load_trained(target, overrides, report=True)
    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    print(
        f"eval {target}: {cfg['data']['source']['type']} validation split, windows of {cfg['data']['seq_len']} tokens"
    )
    r = evaluate_model(model, data)
    print(f"val loss {r['loss']:.4f} nats/token | {r['bpb']:.4f} bits/byte | ppl {r['ppl']:.3f} | {r['tokens']} tokens")
    if not math.isfinite(r["loss"]):
        raise NonFiniteLossError(f"{target}: the held-out loss is {r['loss']}: these weights are diverged")
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "checkpoint file, run directory, or exported model directory")


def run(args: argparse.Namespace) -> None:
    evaluate(args.target, args.overrides)
