"""Loss and bits per byte (language models) or loss and top-1/top-5 accuracy (image classifiers) of a trained model
on the whole held-out split.

    python -m train eval <checkpoint | run dir | model dir> [dotted.key=value ...]
    python -m train eval <config.yaml> --weights <released checkpoint> [dotted.key=value ...]

Overrides apply to the saved config, e.g. another ``model.mixer`` evaluates the same weights with another
attention. ``--weights``: the authors' released checkpoint of the config's model (e.g. a released ``.pth`` with the
matching ``configs/paper/`` config), converted to our names and loaded strictly. ``mean_loss`` is the one evaluation
loop of the LMs (also used by the long-context study).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .cli import add_target, add_weights


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


@torch.no_grad()
def classifier_metrics(model, data, progress: bool = True) -> dict:
    """Mean cross-entropy and top-1/top-5 accuracy of ``model`` over every validation image of an
    ``ImageDataModule`` (normalised as in training, not augmented) -> {"loss", "acc1", "acc5", "images"}."""
    from .module import topk_accuracy

    model.eval()
    device = next(model.parameters()).device
    loss = acc1 = acc5 = 0.0
    count = 0
    for x, y in tqdm(data.val_dataloader(), desc="eval", disable=not progress, leave=False):
        x, y = data.normalize(x.to(device)), y.to(device)  # [b, C, S, S], [b]
        logits = model(x)  # [b, classes]
        n = y.shape[0]
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        acc1 += n * topk_accuracy(logits, y, 1).item()
        acc5 += n * topk_accuracy(logits, y, 5).item()
        count += n
    return {"loss": loss / count, "acc1": acc1 / count, "acc5": acc5 / count, "images": count}


def evaluate_classifier(cfg: dict, model, target: str) -> dict:
    from .datamodules import ImageDataModule

    data = ImageDataModule(cfg)
    data.setup()
    print(f"eval {target}: {cfg['data']['source']['type']} validation split, {len(data.splits['validation'])} images")
    r = classifier_metrics(model, data)
    print(
        f"val loss {r['loss']:.4f} | top-1 {100 * r['acc1']:.2f}% | top-5 {100 * r['acc5']:.2f}% | {r['images']} images"
    )
    return r


def evaluate(target: str, overrides=(), weights: str | None = None) -> dict:
    """Evaluate on the whole held-out split; a non-finite loss (diverged weights) raises ``NonFiniteLossError``."""
    from .checkpoint import load_target
    from .config import task_of
    from .datamodules import LMDataModule
    from .errors import NonFiniteLossError

    cfg, model = load_target(target, overrides, weights, report=True)
    if weights is not None:
        print(f"weights: {weights} (released checkpoint, converted and loaded strictly)")
    if task_of(cfg) == "classification":
        r = evaluate_classifier(cfg, model, target)
    else:
        data = LMDataModule(cfg, full_validation=True)
        data.setup()
        print(
            f"eval {target}: {cfg['data']['source']['type']} validation split, windows of {cfg['data']['seq_len']} "
            "tokens"
        )
        r = evaluate_model(model, data)
        print(
            f"val loss {r['loss']:.4f} nats/token | {r['bpb']:.4f} bits/byte | ppl {r['ppl']:.3f} | "
            f"{r['tokens']} tokens"
        )
    if not math.isfinite(r["loss"]):
        raise NonFiniteLossError(f"{target}: the held-out loss is {r['loss']}: these weights are diverged")
    return r


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "checkpoint file, run directory, or exported model directory (with --weights: a config YAML)")
    add_weights(p)


def run(args: argparse.Namespace) -> None:
    evaluate(args.target, args.overrides, args.weights)
