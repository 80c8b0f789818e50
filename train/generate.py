"""Generate text from a trained LM.

    python -m train sample <checkpoint | run dir | model dir> [dotted.key=value ...] [--prompt TEXT] [--tokens N]

Decoding is incremental (each layer's cache) while the sequence fits the context; a mixer without incremental
decoding re-runs the window for every new token.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn


def _prefill_cache(model: nn.Module, out: torch.Tensor):
    """(logits of the last position [1, V], decoding cache) by feeding the prompt through ``model.step``, or
    (None, None) if some layer cannot decode incrementally (a mixer without ``step``) or the prompt fills the
    context."""
    if not hasattr(model, "step") or out.shape[1] >= model.max_seq_len:
        return None, None
    cache = model.new_cache()
    try:
        for t in range(out.shape[1]):
            logits = model.step(out[:, t : t + 1], cache)
    except NotImplementedError:  # no step for this mixer or mode
        return None, None
    return logits[:, -1], cache


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: list[int],
    n_new: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
    incremental: bool = True,
) -> list[int]:
    """Append ``n_new`` sampled tokens to ``ids``; the context is cropped to the model's ``max_seq_len``.

    ``incremental``: decode token by token with the model's cache (``CausalLM.step``: keys, values and sparse
    mixers' state) while the sequence fits the context, else (or for mixers without ``step``) re-run the model on
    the last ``max_seq_len`` tokens for every new token."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.tensor([ids], device=device)  # [1, T]
    last, cache = _prefill_cache(model, out) if incremental else (None, None)
    for _ in range(n_new):
        if cache is None:
            last = model(out[:, -model.max_seq_len :])[:, -1]
        logits = last.float() / temperature  # [1, V]
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)  # [1, 1]
        out = torch.cat([out, nxt], dim=1)
        if cache is not None:
            if out.shape[1] > model.max_seq_len:  # the context is full: from now on, re-run the cropped window
                cache = None
            else:
                last = model.step(nxt, cache)[:, -1]
    model.train(was_training)
    return out[0].tolist()


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    n_new: int,
    temperature: float = 0.8,
    top_k: int | None = None,
    seed: int = 0,
) -> str:
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id or 0]
    return tokenizer.decode(generate(model, ids, n_new, temperature, top_k, seed))


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import add_target

    add_target(p, "checkpoint file, run directory, or exported model directory")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)


def check_arguments(args: argparse.Namespace) -> None:
    from arch.registry import ConfigError

    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"--temperature: {args.temperature} is not allowed; allowed values: a finite number > 0")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k: {args.top_k} is not allowed; allowed values: an integer >= 1 (or omit it)")
    if args.tokens < 0:
        raise ConfigError(f"--tokens: {args.tokens} is not allowed; allowed values: an integer >= 0")


def run(args: argparse.Namespace) -> None:
    from .checkpoint import load_trained
    from .data import build_tokenizer

    check_arguments(args)  # before the model is loaded
    cfg, model = load_trained(args.target, args.overrides, report=True)
    print(
        f"sampling {args.tokens} tokens from {args.target} (temperature {args.temperature}, top-k {args.top_k}, "
        f"seed {args.seed})"
    )
    tokenizer = build_tokenizer(cfg["data"]["tokenizer"])
    print(generate_text(model, tokenizer, args.prompt, args.tokens, args.temperature, args.top_k, args.seed))
