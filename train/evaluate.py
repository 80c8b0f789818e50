"""``python -m train eval``: loss and bits per byte of a trained model on the whole held-out split."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from .checkpoint import load_trained
from .data import LMDataModule, bits_per_byte
from .module import lm_loss


@torch.no_grad()
def evaluate_model(model, data: LMDataModule, progress: bool = True) -> dict:
    """Token-weighted mean cross-entropy over every validation window."""
    model.eval()
    total, n = 0.0, 0
    for batch in tqdm(data.val_dataloader(), desc="eval", disable=not progress, leave=False):
        tokens = batch[:, 1:].numel()
        total += lm_loss(model, batch).item() * tokens
        n += tokens
    loss = total / n
    return {"loss": loss, "bpb": bits_per_byte(loss, data.bytes_per_token), "ppl": math.exp(loss), "tokens": n}


def evaluate(target: str, overrides=()) -> dict:
    cfg, model = load_trained(target, overrides)
    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    print(
        f"eval {target}: {cfg['data']['source']['type']} validation split, windows of {cfg['data']['seq_len']} tokens"
    )
    r = evaluate_model(model, data)
    print(f"val loss {r['loss']:.4f} nats/token | {r['bpb']:.4f} bits/byte | ppl {r['ppl']:.3f} | {r['tokens']} tokens")
    return r
