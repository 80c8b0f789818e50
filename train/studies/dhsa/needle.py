"""Long context: passkey retrieval grid and perplexity vs context length, dense vs sparse attention variants.

    python -m train needle <checkpoint | run dir | model dir> [dotted.key=value ...] [--variants dense dhsa fixed]
        [--budget B] [--mixer key=value ...] [--lengths 256 512 ...] [--depths 0 0.5 1] [--trials 10] [--seed 0]
        [--ppl-tokens 65536] [--out DIR]

**Variants** are the same weights rebuilt with config overrides (``load_trained(target, overrides)``), one at a
time (load, evaluate, free), so only one model is in memory:

* ``dense``: the model as saved (plus the command line's ``dotted.key=value`` overrides, which every variant gets);
* ``dhsa``: ``model.mixer.type=dhsa model.mixer.budget=B`` (B: ``--budget``, default a quarter of the longest
  context evaluated) plus every ``--mixer key=value`` as ``model.mixer.key=value``;
* ``fixed``: as ``dhsa`` plus ``model.mixer.chunker=fixed`` (last, so it wins over ``--mixer chunker=...``): the
  fixed-block-sparse baseline at the same budget.

Only the model-wide ``model.mixer`` changes: a layer whose mixer is set by a per-layer override (``model.layers``)
keeps that mixer. Every variant's per-layer mixers are printed and saved (``layer_mixers``) so this is visible.

**Passkey retrieval** (needle in a haystack), for every context length L x needle depth d: ``--trials`` prompts of
exactly L tokens = haystack (held-out text of the model's own data source, tokenized with its tokenizer) with the
needle ``" The pass key is 48213. Remember it. 48213 is the pass key. "`` inserted at relative depth d (snapped to
the nearest whitespace boundary within 32 tokens), then ``" What is the pass key? The pass key is "`` and the
5-digit answer. Trial t at length L draws its passkey and haystack from a generator seeded by (``--seed``, L, t):
the depths of one trial share haystack and passkey, and every variant sees the identical prompts (built once).

Scoring is **teacher-forced**: one forward pass over the L tokens (the trials of a cell batched), and a trial is
correct iff the argmax at each answer position is the true next digit. This exact-match accuracy equals greedy
decoding's (greedy reproduces the answer iff every argmax given the correct prefix is correct) at the cost of
one pass instead of five. Also recorded: the fraction of digits right and the mean log-probability per answer
digit (nats), which still separates variants when a small model's accuracy is near 0.

**Perplexity** at each length L: mean next-token loss over non-overlapping windows of L tokens (+1 target) of the
held-out split, as loss, bits/byte and ppl, and each variant's ppl ratio to ``dense`` at that length. The windows
tile the same ``--ppl-tokens // longest length`` spans of text (spread evenly over the split) at every length, so
the lengths score the same tokens and differ only in how much context each token sees.

Writes ``needle.json`` (all numbers, the arguments, each variant's overrides), ``needle.png`` (an accuracy heatmap
per variant) and ``ppl.png`` (ppl vs context length) into ``--out`` (default ``<run dir>/needle/``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from arch.attention import causal_attention_probs
from arch.io import atomic_write
from arch.registry import ConfigError
from train.checkpoint import load_trained, run_dir_of, saved_config
from train.cli import add_target
from train.config import load_config
from train.data import bits_per_byte, build_tokenizer
from train.datamodules import LMDataModule
from train.evaluate import mean_loss
from train.plotting import figure
from train.runs import device_for

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is "
DEFAULT_LENGTHS = (256, 512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
LEARNED_ONLY = ("predictor", "predictor_residual", "shared_predictor")  # fixed chunks reject them
SNAP_TOKENS = 32  # the needle moves at most this far to reach a whitespace boundary
SCORING = (
    "teacher-forced: one forward pass of prompt + answer per trial; correct iff the argmax at every "
    "answer position is the true digit (= greedy decoding's exact match)"
)


# --------------------------------------------------------------------------------------------- variants
def variant_table(budget: int, mixer: Sequence[str] = ()) -> dict[str, list[str]]:
    """{variant name: config overrides}: ``dense``, ``dhsa`` at ``budget``, ``fixed`` blocks at ``budget``.
    ``mixer``: extra ``key=value`` options of both sparse variants (``model.mixer.key=value``), except that the
    learned chunker's own options (``LEARNED_ONLY``: its predictor file and how it is used) go to ``dhsa`` only."""
    extra, learned = [], []
    for item in mixer:
        key, sep, _ = item.partition("=")
        if not sep or not key or "." in key:
            raise ConfigError(f"--mixer {item!r}: expected key=value of the sparse mixer, e.g. --mixer chunker=learned")
        (learned if key.strip() in LEARNED_ONLY else extra).append(f"model.mixer.{item}")
    sparse = ["model.mixer.type=dhsa", f"model.mixer.budget={budget}", *extra]
    return {"dense": [], "dhsa": [*sparse, *learned], "fixed": [*sparse, "model.mixer.chunker=fixed"]}


def _requested_mixer(overrides: Sequence[str]) -> Optional[str]:
    """The value of the last ``model.mixer.type=...`` override, if any."""
    found = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "model.mixer.type"]
    return found[-1] if found else None


# --------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    """One passkey trial: ``ids`` (exactly the context length) = haystack[:needle_start] + needle +
    haystack[needle_start:] + question + answer."""

    ids: list[int]
    passkey: str
    needle_start: int  # index of the needle's first token in ids
    needle_len: int
    haystack_len: int
    answer_start: int  # index of the first answer token; the answer runs to the end of ids

    @property
    def depth(self) -> float:
        """The needle's actual relative depth in the haystack (after snapping)."""
        return self.needle_start / self.haystack_len


class _Boundaries:
    """Whitespace boundaries between tokens, for any tokenizer: before token i if token i-1 ends with whitespace
    (or is end-of-document) or token i starts with whitespace. Token texts are decoded once and cached."""

    def __init__(self, tokenizer):
        self.tokenizer, self.text = tokenizer, {}

    def _text(self, t: int) -> str:
        if t not in self.text:
            self.text[t] = self.tokenizer.decode([t])
        return self.text[t]

    def is_boundary(self, ids: Sequence[int], i: int) -> bool:
        if i <= 0 or i >= len(ids):
            return True
        before, after = self._text(ids[i - 1]), self._text(ids[i])
        return ids[i - 1] == self.tokenizer.eos_id or before[-1:].isspace() or after[:1].isspace()

    def snap(self, ids: Sequence[int], pos: int) -> int:
        """The boundary nearest ``pos`` (the earlier one on ties), within ``SNAP_TOKENS``; else ``pos``."""
        for shift in range(SNAP_TOKENS + 1):
            for i in (pos - shift, pos + shift):
                if 0 <= i <= len(ids) and self.is_boundary(ids, i):
                    return i
        return pos


def fixed_tokens(tokenizer, passkey: str = "12345") -> int:
    """Tokens that are not haystack: needle + question + answer."""
    return sum(len(tokenizer.encode(s)) for s in (NEEDLE.format(key=passkey), QUESTION, passkey))


def build_prompt(
    haystack: Sequence[int],
    length: int,
    depth: float,
    passkey: str,
    tokenizer,
    boundaries: Optional[_Boundaries] = None,
) -> Prompt:
    """A prompt of exactly ``length`` tokens: the first tokens of ``haystack`` with the needle at relative
    ``depth`` (0: before the first haystack token, 1: right before the question), the question, the answer."""
    needle = tokenizer.encode(NEEDLE.format(key=passkey))
    question, answer = tokenizer.encode(QUESTION), tokenizer.encode(passkey)
    n_hay = length - len(needle) - len(question) - len(answer)
    if n_hay < 1:
        need = len(needle) + len(question) + len(answer)
        raise ConfigError(
            f"--lengths: {length} leaves no room for a haystack: the needle, question and answer "
            f"take {need} tokens; allowed lengths: >= {need + 1}"
        )
    if not 0 <= depth <= 1:
        raise ConfigError(f"--depths: {depth} is outside the allowed range 0..1")
    if len(haystack) < n_hay:
        raise ValueError(f"haystack has {len(haystack)} tokens; a {length}-token prompt needs {n_hay}")
    hay = [int(t) for t in haystack[:n_hay]]
    pos = (boundaries or _Boundaries(tokenizer)).snap(hay, round(depth * n_hay))
    ids = hay[:pos] + needle + hay[pos:] + question + answer
    return Prompt(ids, passkey, pos, len(needle), n_hay, len(ids) - len(answer))


def build_cells(
    tokens: np.ndarray,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int,
    key: str = "digits",
) -> dict[tuple[int, float], list[Prompt]]:
    """{(length, depth): ``trials`` prompts}. Trial t at length L takes its passkey and haystack offset (into the
    held-out ``tokens``) from a generator seeded by (seed, L, t), the same for every depth. ``key``: ``digits``
    (5 digits, as in the passkey benchmarks) or ``letters`` (5 capital letters: a model trained on text without
    digits, like the Shakespeare byte models, can still copy them)."""
    if key not in ("digits", "letters"):
        raise ConfigError(f"--key: {key!r}; allowed values: digits, letters")
    boundaries = _Boundaries(tokenizer)
    cells = {(L, d): [] for L in lengths for d in depths}
    for L in lengths:
        if len(tokens) <= L:
            raise ConfigError(f"--lengths: {L} is longer than the held-out split ({len(tokens)} tokens)")
        for t in range(trials):
            rng = np.random.default_rng([seed, L, t])
            passkey = (
                str(int(rng.integers(10_000, 100_000)))
                if key == "digits"
                else "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5))
            )
            start = int(rng.integers(0, len(tokens) - L))
            haystack = tokens[start : start + L]  # more than enough: the haystack is shorter than L
            for d in depths:
                cells[L, d].append(build_prompt(haystack, L, d, passkey, tokenizer, boundaries))
    return cells


# --------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_prompts(model, prompts: Sequence[Prompt], device="cpu") -> dict:
    """Teacher-forced passkey scores of one cell, all prompts in one forward pass (they have the same length):
    ``accuracy`` (every answer token the argmax), ``digit_accuracy`` (fraction of answer tokens the argmax) and
    ``answer_logprob`` (mean log-probability per answer token, nats). ``model`` may return the logits of only the
    last positions (at least those predicting the answer)."""
    ids = torch.tensor([p.ids for p in prompts], device=device)  # [N, L]
    logits = model(ids)  # [N, L', V]: the last L' <= L positions (a model may return only those)
    off = ids.shape[1] - logits.shape[1]
    exact, digits, logprob = [], [], []
    for i, p in enumerate(prompts):
        a = p.answer_start
        target = ids[i, a:]  # [n_answer]
        logp = F.log_softmax(logits[i, a - 1 - off : len(p.ids) - 1 - off].float(), dim=-1)  # [n_answer, V]
        hit = logp.argmax(-1) == target  # [n_answer]
        exact.append(bool(hit.all()))
        digits.append(hit.float().mean().item())
        logprob.append(logp.gather(1, target[:, None]).mean().item())
    n = len(prompts)
    return {"accuracy": sum(exact) / n, "digit_accuracy": sum(digits) / n, "answer_logprob": sum(logprob) / n}


def ppl_windows(n_tokens: int, lengths: Sequence[int], max_tokens: int) -> dict[int, np.ndarray]:
    """{length: window start offsets}. K = ``max_tokens // max(lengths)`` spans (at least one) of the longest
    length, spread evenly over a split of ``n_tokens`` tokens; each span is cut into non-overlapping windows of
    every length. So all lengths score the same text (exactly, where a length divides the longest) and differ
    only in how much context each token sees."""
    span = max(lengths)
    n_spans = (n_tokens - 1) // span
    if n_spans < 1:
        raise ConfigError(f"--lengths: {span} is longer than the held-out split ({n_tokens} tokens)")
    keep = min(n_spans, max(1, max_tokens // span))
    spans = np.linspace(0, n_spans - 1, keep).round().astype(np.int64) * span  # [K]
    return {L: (spans[:, None] + np.arange(span // L) * L).ravel() for L in lengths}  # [K * (span // L)]


def selection_recall(q: torch.Tensor, k: torch.Tensor, kv: torch.Tensor, query_block: int) -> torch.Tensor:
    """Attention recall of a key selection: the share of each query's dense causal attention probability
    (softmax of q kᵀ/√hd over every past key) that falls on the keys its query block selected.
    q [1, T, H, hd], k [1, T, Hkv, hd], kv [1, nb, S] (DHSA's selection, -1 padded) -> [H, T]."""
    T = q.shape[1]
    p = causal_attention_probs(q, k)[0]  # [H, T, T]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    chosen = torch.zeros(kv.shape[1], T + 1, dtype=torch.bool, device=q.device)  # [nb, T + 1]; column T: padding
    chosen.scatter_(1, torch.where(kv[0] >= 0, kv[0], T), True)
    keep = chosen[torch.arange(T, device=q.device) // query_block, :T] & causal  # [T, T]
    return (p * keep).sum(-1)  # [H, T]


@contextmanager
def recording_recall(model):
    """While active, a forward hook on every DHSA mixer's ``selection_tap`` records ``selection_recall`` of its
    selections, one sequence at a time; yields {layer: [sum of recalls, count]}."""
    from arch.dhsa import DHSA

    stats: dict[int, list[float]] = {}

    def hook(i: int, query_block: int):
        def record(module, inputs, output) -> None:
            q, k, kv = inputs
            acc = stats.setdefault(i, [0.0, 0])
            for b in range(q.shape[0]):
                r = selection_recall(q[b : b + 1].float(), k[b : b + 1].float(), kv[b : b + 1], query_block)
                acc[0], acc[1] = acc[0] + r.sum().item(), acc[1] + r.numel()

        return record

    mixers = [(i, b.mixer) for i, b in enumerate(model.blocks) if isinstance(b.mixer, DHSA)]
    handles = [m.selection_tap.register_forward_hook(hook(i, m.query_block)) for i, m in mixers]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def perplexity(model, tokens: np.ndarray, starts: np.ndarray, length: int, batch_tokens: int, device="cpu") -> dict:
    """Mean next-token loss over the windows ``tokens[s : s + length + 1]`` for s in ``starts``, about
    ``batch_tokens`` tokens per forward pass; with DHSA mixers also their mean attention recall (all layers, and
    per layer), see ``selection_recall``."""
    per_batch = max(1, batch_tokens // length)
    batches = (
        torch.from_numpy(np.stack([tokens[s : s + length + 1] for s in starts[i : i + per_batch]]))  # [b, length + 1]
        for i in range(0, len(starts), per_batch)
    )
    with recording_recall(model) as recall:
        out = {**mean_loss(model, batches, device), "windows": len(starts)}
    if recall:
        per_layer = {i: s / n for i, (s, n) in sorted(recall.items())}
        out.update(recall=sum(per_layer.values()) / len(per_layer), recall_per_layer=per_layer)
    return out


def evaluate_variant(
    model,
    cells: dict,
    val_tokens: np.ndarray,
    windows: dict[int, np.ndarray],
    lengths: Sequence[int],
    depths: Sequence[float],
    bytes_per_token: float,
    batch_tokens: int,
    device="cpu",
    desc: str = "",
    progress: bool = True,
) -> dict:
    """Passkey matrices [depth][length] over the prompt ``cells`` and perplexity rows over the ppl ``windows``
    (``ppl_windows``) of one model."""
    model.eval()
    bar = tqdm(total=len(cells) + len(lengths), desc=desc, disable=not progress, leave=False)
    grid = {k: [[0.0] * len(lengths) for _ in depths] for k in ("accuracy", "digit_accuracy", "answer_logprob")}
    for j, L in enumerate(lengths):
        for i, d in enumerate(depths):
            for key, value in score_prompts(model, cells[L, d], device).items():
                grid[key][i][j] = value
            bar.update()
    ppl = []
    for L in lengths:
        r = perplexity(model, val_tokens, windows[L], L, batch_tokens, device)
        ppl.append({"length": L, **r, "bpb": bits_per_byte(r["loss"], bytes_per_token), "ppl": math.exp(r["loss"])})
        bar.update()
    bar.close()
    return {"passkey": grid, "ppl": ppl}


# --------------------------------------------------------------------------------------------- the command
def resolve_lengths(requested: Optional[Sequence[int]], max_seq_len: int) -> list[int]:
    """``requested`` (each must fit the model), else the defaults capped at ``max_seq_len`` (deduplicated)."""
    if requested:
        too_long = [L for L in requested if L > max_seq_len]
        if too_long:
            raise ConfigError(
                f"--lengths: {too_long[0]} exceeds the model's max_seq_len={max_seq_len}; "
                f"allowed lengths: up to {max_seq_len}"
            )
        return list(dict.fromkeys(requested))
    return list(dict.fromkeys(min(L, max_seq_len) for L in DEFAULT_LENGTHS))


Variants = Union[dict[str, list[str]], Callable[[list[int]], dict[str, list[str]]]]


def check_args(trials: int, ppl_tokens: int, batch_tokens: int, depths: Sequence[float]) -> list[float]:
    """The options every run checks first; returns the depths deduplicated, as floats."""
    if trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {trials}")
    if ppl_tokens < 1 or batch_tokens < 1:
        raise ConfigError("--ppl-tokens and --batch-tokens: must be >= 1")
    bad = [d for d in depths if not 0 <= d <= 1]
    if bad or not depths:
        raise ConfigError(
            f"--depths: {bad[0] if bad else 'none given'}; allowed depths: 0..1 (0 = start of the "
            "haystack, 1 = right before the question)"
        )
    return [float(d) for d in dict.fromkeys(depths)]


def check_variants(base: dict, overrides: Sequence[str], variants: dict, lengths: Sequence[int]) -> None:
    """Every variant's config is checked before anything is evaluated."""
    for name, extra in variants.items():
        try:
            vcfg = load_config(None, [*overrides, *extra], base=base)
        except ConfigError as e:
            raise ConfigError(f"variant {name} ({' '.join(extra)}): {e}") from None
        if vcfg["model"]["max_seq_len"] < max(lengths):
            raise ConfigError(
                f"variant {name}: max_seq_len={vcfg['model']['max_seq_len']} is shorter than --lengths {max(lengths)}"
            )


def run_variant(target: str, overrides: Sequence[str], name: str, extra: list[str], inputs: dict, device) -> dict:
    """Load one variant (the saved weights with ``extra`` overrides), evaluate it, free it."""
    t0 = time.perf_counter()
    _, model = load_trained(target, [*overrides, *extra], map_location=device)
    layer_mixers = [spec["mixer"]["type"] for spec in getattr(model, "per_layer", [])]
    want = _requested_mixer(extra)
    kept = [i for i, m in enumerate(layer_mixers) if want is not None and m != want]
    if kept:
        print(
            f"  note: variant {name}: layers {', '.join(map(str, kept))} keep their own mixer from "
            f"model.layers ({', '.join(sorted({layer_mixers[i] for i in kept}))}), not {want}"
        )
    r = evaluate_variant(model, device=device, desc=name, **inputs)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result = {"overrides": list(extra), "layer_mixers": layer_mixers, **r, "seconds": time.perf_counter() - t0}
    ppl = " ".join(f"{p['ppl']:.3f}@{p['length']}" for p in r["ppl"])
    acc = np.mean(r["passkey"]["accuracy"])
    print(f"  {name}: mean passkey accuracy {acc:.3f}, ppl {ppl} ({result['seconds']:.1f} s)", flush=True)
    return result


def needle(
    target: str,
    overrides: Sequence[str] = (),
    variants: Optional[Variants] = None,
    lengths: Optional[Sequence[int]] = None,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = 10,
    seed: int = 0,
    ppl_tokens: int = 65536,
    batch_tokens: int = 32768,
    out_dir: Optional[str] = None,
    arguments: Optional[dict] = None,
    progress: bool = True,
    key: str = "digits",
) -> dict:
    """Evaluate ``target`` under each variant ({name: overrides}; default: ``dense`` only); print the tables,
    write needle.json, needle.png and ppl.png. ``variants`` may also be a function of the resolved lengths
    (``lengths -> {name: overrides}``), for defaults that depend on them (the sparse budget)."""
    depths = check_args(trials, ppl_tokens, batch_tokens, depths)
    base = saved_config(target)
    cfg = load_config(None, overrides, base=base)
    lengths = resolve_lengths(lengths, cfg["model"]["max_seq_len"])
    tokenizer = build_tokenizer(cfg["data"]["tokenizer"])
    need = fixed_tokens(tokenizer)
    if min(lengths) <= need:
        raise ConfigError(
            f"--lengths: {min(lengths)} leaves no room for a haystack: the needle, question and "
            f"answer take {need} tokens; allowed lengths: {need + 1}..{cfg['model']['max_seq_len']}"
        )
    variants = dict((variants(lengths) if callable(variants) else variants) or {"dense": []})
    check_variants(base, overrides, variants, lengths)
    device = device_for()
    out = Path(out_dir) if out_dir else run_dir_of(target) / "needle"
    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    val = data.splits["validation"]["tokens"]
    inputs = {"cells": build_cells(val, tokenizer, lengths, depths, trials, seed, key), "val_tokens": val}
    inputs.update(windows=ppl_windows(len(val), lengths, ppl_tokens), lengths=lengths, depths=depths)
    inputs.update(bytes_per_token=data.bytes_per_token, batch_tokens=batch_tokens, progress=progress)
    n_ppl = len(inputs["windows"][max(lengths)]) * max(lengths)
    print(
        f"needle {target} on {device}: variants {', '.join(variants)}; passkey retrieval at lengths "
        f"{' '.join(map(str, lengths))} x depths {' '.join(f'{d:g}' for d in depths)} x {trials} trials "
        f"(seed {seed}, teacher-forced); perplexity on the same {n_ppl} tokens at every length; "
        f"haystack and perplexity text: {cfg['data']['source']['type']} held-out split ({len(val)} tokens)\n"
        f"  writing {out}/ (needle.json, needle.png, ppl.png)",
        flush=True,
    )
    results = {name: run_variant(target, overrides, name, extra, inputs, device) for name, extra in variants.items()}
    if "dense" in results:
        for r in results.values():
            for row, ref in zip(r["ppl"], results["dense"]["ppl"]):
                row["ppl_ratio_vs_dense"] = row["ppl"] / ref["ppl"]
    if arguments is None:
        arguments = {"target": str(target), "overrides": list(overrides), "lengths": lengths, "depths": depths}
        arguments.update(trials=trials, seed=seed, ppl_tokens=ppl_tokens, batch_tokens=batch_tokens, out=str(out))
    result = record(target, out, arguments, cfg, data, tokenizer, inputs["cells"], lengths, depths, trials, results)
    print_tables(result)
    atomic_write(out / "needle.json", lambda p: Path(p).write_text(json.dumps(result, indent=1)))
    paths = plot(result, out)
    print(f"\nwrote {out / 'needle.json'}, " + ", ".join(str(p) for p in paths))
    return result


def record(target, out, arguments, cfg, data, tokenizer, cells, lengths, depths, trials, results) -> dict:
    """Everything ``needle.json`` holds: the arguments, the model and data, the prompt format, the results."""
    example = cells[lengths[0], depths[len(depths) // 2]][0]
    m = cfg["model"]
    return {
        "checkpoint": str(target),
        "out": str(out),
        "arguments": arguments,
        "model": {"name": cfg.get("name"), **{k: m[k] for k in ("max_seq_len", "n_layers", "d_model")}},
        "data": {
            "source": cfg["data"]["source"],
            "tokenizer": cfg["data"]["tokenizer"],
            "validation_tokens": int(len(data.splits["validation"]["tokens"])),
            "bytes_per_token": data.bytes_per_token,
        },
        "scoring": SCORING,
        "prompt": {
            "needle": NEEDLE,
            "question": QUESTION,
            "snap_tokens": SNAP_TOKENS,
            "example": {
                "length": lengths[0],
                "depth": example.depth,
                "passkey": example.passkey,
                "text": tokenizer.decode(example.ids),
            },
        },
        "lengths": lengths,
        "depths": depths,
        "trials": trials,
        "variants": results,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "checkpoint file, run directory, or exported model directory of an LM")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=["dense", "dhsa", "fixed"],
        default=["dense", "dhsa", "fixed"],
        help="dense: as saved; dhsa: model.mixer.type=dhsa at --budget; fixed: dhsa with fixed blocks",
    )
    p.add_argument("--budget", type=int, default=None, help="sparse budget (model.mixer.budget; default: longest // 4)")
    p.add_argument(
        "--mixer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of both sparse variants, as model.mixer.KEY=VALUE (repeatable)",
    )
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="context lengths (default: 256 .. 2048)")
    p.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=list(DEFAULT_DEPTHS),
        help="relative needle depths, 0 = start of the haystack, 1 = right before the question",
    )
    p.add_argument("--trials", type=int, default=10, help="random passkeys per (length, depth) cell")
    p.add_argument(
        "--key",
        choices=["digits", "letters"],
        default="digits",
        help="passkey of 5 digits, or of 5 capital letters (models trained on text without digits)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of passkeys and haystacks (the same for every variant)")
    p.add_argument("--ppl-tokens", type=int, default=65536, help="held-out tokens for perplexity (same at each length)")
    p.add_argument("--batch-tokens", type=int, default=32768, help="tokens per forward pass for perplexity")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/needle)")


def run(args: argparse.Namespace) -> dict:
    """The named variants of ``variant_table`` at ``--budget`` (default: longest length // 4)."""
    if args.budget is not None and args.budget < 1:
        raise ConfigError(f"--budget: must be >= 1, got {args.budget}")
    names = list(dict.fromkeys(args.variants))
    variant_table(1, args.mixer)  # checks --mixer before the checkpoint is read
    arguments = {k: getattr(args, k) for k in ("target", "budget", "mixer", "lengths", "depths", "trials", "seed")}
    arguments.update(overrides=list(args.overrides), variants=names, out=args.out, key=args.key)
    arguments.update(ppl_tokens=args.ppl_tokens, batch_tokens=args.batch_tokens)

    def table(resolved: list[int]) -> dict[str, list[str]]:
        arguments["budget_resolved"] = args.budget if args.budget is not None else max(1, max(resolved) // 4)
        full = variant_table(arguments["budget_resolved"], args.mixer)
        return {name: full[name] for name in names}

    return needle(
        args.target,
        args.overrides,
        table,
        args.lengths,
        args.depths,
        args.trials,
        args.seed,
        args.ppl_tokens,
        args.batch_tokens,
        args.out,
        arguments=arguments,
        key=args.key,
    )


# --------------------------------------------------------------------------------------------- report
def print_passkey(result: dict) -> None:
    """Per variant: passkey accuracy and answer log-probability (rows = depth, columns = length)."""
    lengths, depths, variants = result["lengths"], result["depths"], result["variants"]
    head = "| depth \\ length | " + " | ".join(str(L) for L in lengths) + " |\n|---:|" + "---:|" * len(lengths)
    for name, r in variants.items():
        print(
            f"\npasskey accuracy, {name} ({' '.join(r['overrides']) or 'as saved'}; "
            f"{result['trials']} trials per cell)\n{head}"
        )
        for i, d in enumerate(depths):
            print(f"| {d:.2f} | " + " | ".join(f"{a:.2f}" for a in r["passkey"]["accuracy"][i]) + " |")
        print(f"\nmean log-probability per answer digit (nats), {name}\n{head}")
        for i, d in enumerate(depths):
            print(f"| {d:.2f} | " + " | ".join(f"{a:.3f}" for a in r["passkey"]["answer_logprob"][i]) + " |")


def print_tables(result: dict) -> None:
    """``print_passkey``; then one ppl table (rows = length, columns = variants and their ratio to dense)."""
    print_passkey(result)
    lengths, variants = result["lengths"], result["variants"]
    ratios = [n for n in variants if n != "dense" and "dense" in variants]
    print("\nperplexity on the held-out split (ppl; bits/byte in parentheses)")
    print("| length | " + " | ".join(variants) + "".join(f" | {n} / dense" for n in ratios) + " |")
    print("|---:|" + "---:|" * (len(variants) + len(ratios)))
    for j, L in enumerate(lengths):
        cells = [f"{r['ppl'][j]['ppl']:.3f} ({r['ppl'][j]['bpb']:.3f})" for r in variants.values()]
        cells += [f"{variants[n]['ppl'][j]['ppl_ratio_vs_dense']:.3f}" for n in ratios]
        print(f"| {L} | " + " | ".join(cells) + " |")
    sparse = [n for n, r in variants.items() if "recall" in r["ppl"][0]]
    if sparse:
        print(
            "\nattention recall: share of the dense attention probability on the selected keys (mean over layers,"
            " heads, queries)"
        )
        print("| length | " + " | ".join(sparse) + " |\n|---:|" + "---:|" * len(sparse))
        for j, L in enumerate(lengths):
            print(f"| {L} | " + " | ".join(f"{variants[n]['ppl'][j]['recall']:.4f}" for n in sparse) + " |")


def plot_passkey(result: dict, path: Path) -> Path:
    """An accuracy heatmap per variant (x = length, y = depth) at ``path``."""
    lengths, depths, variants = result["lengths"], result["depths"], result["variants"]
    n = len(variants)
    size = (2.2 + (0.9 * len(lengths) + 0.6) * n, 0.5 * len(depths) + 2.0)
    with figure(path, size, ncols=n, squeeze=False, sharey=True) as (fig, axes):
        for ax, (name, r) in zip(axes[0], variants.items()):
            acc = np.asarray(r["passkey"]["accuracy"])  # [depths, lengths]
            im = ax.imshow(acc, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    dark = acc[i, j] < 0.2 or acc[i, j] > 0.85  # the ends of RdYlGn are dark
                    ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8, color="w" if dark else "k")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set(xlabel="context length (tokens)", title=name)
        axes[0][0].set_ylabel("needle depth (0 = start)")
        fig.colorbar(im, ax=axes[0].tolist(), label="passkey accuracy")
        fig.suptitle(f"passkey retrieval, {result['trials']} trials per cell", fontsize=10)
    return path


def plot(result: dict, out: Path) -> list[Path]:
    """needle.png: ``plot_passkey``; ppl.png: ppl vs length per variant."""
    lengths, variants = result["lengths"], result["variants"]
    paths = [plot_passkey(result, out / "needle.png"), out / "ppl.png"]
    with figure(paths[1], (6.0, 4.0)) as (fig, ax):
        for name, r in variants.items():
            ax.plot(lengths, [row["ppl"] for row in r["ppl"]], "o-", label=name)
        ax.set(xlabel="context length (tokens)", ylabel="perplexity (held-out)", title="perplexity vs context length")
        if len(lengths) > 1 and max(lengths) / min(lengths) >= 4:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.legend(fontsize=8)
    return paths
