"""DHSA quality in the paper's inference mode: the held-out loss and attention recall of the same weights with
fixed block-sparse attention, DHSA with our options, DHSA with the authors' options, and dense attention.

    python -m train dhsa-quality <checkpoint | run dir | model dir> --ours FILE --authors FILE
        [--budgets 128 64] [--mixer key=value ...] [--tokens N] [--rows fixed ours authors dense] [--out FILE]
    python -m train dhsa-quality <same target> --merge A.json B.json ...   # one table from runs of some --rows

Every sparse row is ``model.mixer.type=dhsa model.mixer.mode=prefill model.mixer.budget=B`` (prefill-mode
selection, as the authors run DHSA on a prompt; the loss of a prompt's positions is what prefill quality means
for an LM) plus every ``--mixer key=value`` (e.g. ``n_init=16 n_recent=32``), and then:

* ``fixed``: ``chunker=fixed``, the paper's block-sparse baseline (chunks of ``chunk_size`` tokens);
* ``ours``: the switch that ``python -m train dhsa-boundaries --setting ours`` printed for ``--ours`` (per-layer
  predictors, LayerNorm(x + attn(x)), each layer chunks its own keys) and ``query_rep=chunks`` (the mean of the
  block's positions' Q_c: our reading of the paper's text);
* ``authors``: the switch printed for ``--authors`` (``--setting authors``: one predictor for all layers,
  LayerNorm(attn(x)), layer 0's chunks shared by every layer) and ``query_rep=block`` (√n · the mean of the
  block's own queries: the released code's query representation);
* ``dense``: the model as saved (the command line's ``dotted.key=value`` overrides apply to every row).

The two DHSA rows differ only in the query representation and the predictor options; their threshold, NMS
radius, window and maximum chunk length are the ones their switches print. Each predictor file is checked to be
of its setting (``boundaries.json`` beside it, written by ``dhsa-boundaries``).

Scored on non-overlapping windows of ``model.max_seq_len`` tokens (+1 target) tiling the held-out split (all of
them, or ``--tokens`` // that length of them spread evenly over the split), the same windows for every row: mean
next-token loss (nats/token), bits/byte, the change against dense, and the attention recall (the share of each
query's dense attention probability on the keys its block selected, mean over layers, heads and queries:
``needle.selection_recall``). Writes ``quality.json`` (default ``<run dir>/dhsa/quality.json``).
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from arch.io import atomic_write
from arch.registry import ConfigError
from train.checkpoint import load_trained, run_dir_of, saved_config
from train.cli import add_target
from train.config import load_config
from train.data import bits_per_byte
from train.datamodules import LMDataModule
from train.runs import device_for

from .needle import perplexity, ppl_windows

ROWS = ("fixed", "ours", "authors", "dense")
LABELS = {
    "fixed": "fixed block-sparse",
    "ours": "DHSA, ours (query_rep chunks, --setting ours)",
    "authors": "DHSA, authors' options (query_rep block, --setting authors)",
    "dense": "dense",
}
QUERY_REP = {"ours": "chunks", "authors": "block"}


def predictor_switch(path: str | Path, setting: str) -> list[str]:
    """The overrides ``dhsa-boundaries`` printed for the predictor file ``path`` (read from the
    ``boundaries.json`` it wrote beside it), reading ``path`` (the file may have been moved since); ConfigError
    unless that file was trained with ``--setting setting``."""
    flag = f"--{setting}"
    if path is None:
        raise ConfigError(f"{flag}: the predictor file of row {setting} is required (or leave the row out: --rows)")
    report = Path(path).with_suffix(".json")
    if not Path(path).is_file() or not report.is_file():
        raise ConfigError(
            f"{flag}: {path} and {report.name} beside it must exist: write them with "
            f"`python -m train dhsa-boundaries <run> --setting {setting} --out {path}`"
        )
    got = json.loads(report.read_text())
    if got["setting"]["name"] != setting:
        raise ConfigError(
            f"{flag}: {path} was trained with --setting {got['setting']['name']}; this row needs --setting {setting}"
        )
    switch = [o for o in got["switch"].split() if not o.startswith("model.mixer.predictor=")]
    return [*switch, f"model.mixer.predictor={path}"]


def quality_variants(
    budget: int, switches: dict[str, list[str]], mixer: Sequence[str] = (), rows: Sequence[str] = ROWS
) -> dict[str, list[str]]:
    """{row: overrides} at ``budget`` (module docstring); ``switches``: {"ours"/"authors": predictor_switch}."""
    for item in mixer:
        key, sep, _ = item.partition("=")
        if not sep or not key or "." in key:
            raise ConfigError(f"--mixer {item!r}: expected key=value of the sparse mixer, e.g. --mixer n_init=16")
    sparse = ["model.mixer.type=dhsa", "model.mixer.mode=prefill", f"model.mixer.budget={budget}"]
    sparse += [f"model.mixer.{item}" for item in mixer]
    table = {"fixed": [*sparse, "model.mixer.chunker=fixed"], "dense": []}
    for name in ("ours", "authors"):
        if name in rows:
            table[name] = [*sparse, *switches[name], f"model.mixer.query_rep={QUERY_REP[name]}"]
    return {name: table[name] for name in rows}


def score(target: str, overrides: Sequence[str], extra: list[str], inputs: dict, device) -> dict:
    """Load the weights with ``extra`` overrides, score the windows (``needle.perplexity``), free the model."""
    t0 = time.perf_counter()
    _, model = load_trained(target, [*overrides, *extra], map_location=device)
    r = perplexity(model, inputs["tokens"], inputs["starts"], inputs["length"], inputs["batch_tokens"], device)
    del model
    gc.collect()
    r["bpb"] = bits_per_byte(r["loss"], inputs["bytes_per_token"])
    return {"overrides": list(extra), **r, "seconds": time.perf_counter() - t0}


def dhsa_quality(
    target: str,
    overrides: Sequence[str] = (),
    *,
    ours: Optional[str] = None,
    authors: Optional[str] = None,
    budgets: Sequence[int] = (128, 64),
    mixer: Sequence[str] = (),
    rows: Sequence[str] = ROWS,
    tokens: Optional[int] = None,
    batch_tokens: int = 16384,
    out: Optional[str] = None,
) -> dict:
    """Score every row at every budget (dense once); print the table; write ``quality.json``."""
    rows = list(dict.fromkeys(rows))
    bad = [b for b in budgets if b < 1]
    if bad or not budgets:
        raise ConfigError(f"--budgets: {bad[0] if bad else 'none given'}; allowed: integers >= 1")
    if tokens is not None and tokens < 1:
        raise ConfigError(f"--tokens: must be >= 1, got {tokens}")
    switches = {
        name: predictor_switch(path, name) for name, path in (("ours", ours), ("authors", authors)) if name in rows
    }
    variants = {b: quality_variants(b, switches, mixer, rows) for b in budgets}
    base = saved_config(target)
    for b, table in variants.items():  # every row's config is checked before anything is scored
        for name, extra in table.items():
            try:
                load_config(None, [*overrides, *extra], base=base)
            except ConfigError as e:
                raise ConfigError(f"row {name} at budget {b}: {e}") from None
    cfg = load_config(None, overrides, base=base)
    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    val, T = data.splits["validation"]["tokens"], cfg["model"]["max_seq_len"]
    starts = ppl_windows(len(val), [T], tokens or len(val))[T]
    inputs = {"tokens": val, "starts": starts, "length": T, "batch_tokens": batch_tokens}
    inputs["bytes_per_token"] = data.bytes_per_token
    device = device_for()
    print(
        f"dhsa-quality {target} on {device}: {len(starts)} held-out windows of {T} tokens; rows {', '.join(rows)}; "
        f"budgets {' '.join(map(str, budgets))}",
        flush=True,
    )
    results: dict = {"dense": score(target, overrides, [], inputs, device)} if "dense" in rows else {}
    for b, table in variants.items():
        for name, extra in table.items():
            if name != "dense":
                results[f"{name}@{b}"] = r = score(target, overrides, extra, inputs, device)
                print(f"  {name} at budget {b}: loss {r['loss']:.4f}, recall {r['recall']:.4f}", flush=True)
    result = {"checkpoint": str(target), "overrides": list(overrides), "budgets": list(budgets), "rows": rows}
    result.update(mixer=list(mixer), length=T, window_starts=starts.tolist(), results=results)
    print(format_table(result))
    path = Path(out) if out else run_dir_of(target) / "dhsa" / "quality.json"
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(result, indent=1)))
    print(f"\nwrote {path}")
    return result


def merge_results(target: str, paths: Sequence[str]) -> dict:
    """One result from ``quality.json`` files of the same target, overrides, mixer options and windows (runs of
    different ``--rows`` or ``--budgets``, e.g. in parallel); ConfigError naming the file that does not match."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for path, part in zip(paths, parts):
        for key in ("overrides", "mixer", "length", "window_starts"):
            if part[key] != first[key]:
                raise ConfigError(f"--merge: {path} has other {key} than {paths[0]}; only runs of the same can merge")
        if Path(part["checkpoint"]).resolve() != Path(target).resolve():
            raise ConfigError(f"--merge: {path} scored {part['checkpoint']}, not {target}")
    merged = {**first, "results": {k: v for part in parts for k, v in part["results"].items()}}
    merged["rows"] = [r for r in ROWS if any(r in part["rows"] for part in parts)]
    merged["budgets"] = list(dict.fromkeys(b for part in parts for b in part["budgets"]))
    missing = [f"{r}@{b}" for r in merged["rows"] if r != "dense" for b in merged["budgets"]]
    missing = [m for m in missing if m not in merged["results"]]
    if missing:
        raise ConfigError(f"--merge: no file holds {', '.join(missing)}")
    return merged


def format_table(result: dict) -> str:
    """Markdown: one row per attention, per budget the loss (nats/token, bits/byte), its change against dense and
    the attention recall."""
    budgets, res = result["budgets"], result["results"]
    dense = res.get("dense")
    head = "| attention | " + " | ".join(f"budget {b}: loss (bits/byte), vs dense | recall" for b in budgets) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(budgets)]
    for name in result["rows"]:
        cells = []
        for b in budgets:
            r = dense if name == "dense" else res[f"{name}@{b}"]
            change = f", {100 * (r['loss'] / dense['loss'] - 1):+.2f}%" if dense else ""
            cells += [f"{r['loss']:.4f} ({r['bpb']:.4f}){change}", f"{r['recall']:.4f}" if "recall" in r else "1"]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_target(p, "checkpoint file, run directory, or exported model directory of an LM")
    p.add_argument("--ours", help="predictor file of `dhsa-boundaries --setting ours` (row ours)")
    p.add_argument("--authors", help="predictor file of `dhsa-boundaries --setting authors` (row authors)")
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 64], help="sparse budgets (model.mixer.budget)")
    p.add_argument(
        "--mixer",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option of every sparse row, as model.mixer.KEY=VALUE (repeatable)",
    )
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to score")
    p.add_argument("--tokens", type=int, default=None, help="held-out tokens to score (default: the whole split)")
    p.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward pass")
    p.add_argument("--out", default=None, help="output file (default: <run dir>/dhsa/quality.json)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print one table from these quality.json files")


def run(args: argparse.Namespace) -> dict:
    if args.merge:
        result = merge_results(args.target, args.merge)
        print(f"dhsa-quality {args.target}: merged {' '.join(args.merge)} ({len(result['window_starts'])} windows)")
        print(format_table(result))
        return result
    return dhsa_quality(
        args.target,
        args.overrides,
        ours=args.ours,
        authors=args.authors,
        budgets=args.budgets,
        mixer=args.mixer,
        rows=args.rows,
        tokens=args.tokens,
        batch_tokens=args.batch_tokens,
        out=args.out,
    )
