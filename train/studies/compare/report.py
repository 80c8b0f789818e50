"""The results of a sweep: one row per arm (mean ± std over seeds), ratios to the reference arm with ties marked,
as a markdown table, a JSON file and a plot of every arm's validation loss against training FLOPs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from arch.io import atomic_write

from .runner import read_json, slug, write_json

TIE_STDS = 2.0  # differences smaller than this many standard deviations are ties


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def is_tie(a: dict, b: dict) -> bool | None:
    """Whether arms a and b differ in held-out loss by less than ``TIE_STDS`` standard deviations of the
    difference of one run of each (sqrt(std_a² + std_b²)); None without a std for both."""
    if a["loss_std"] is None or b["loss_std"] is None:
        return None
    return abs(a["loss"] - b["loss"]) < TIE_STDS * math.hypot(a["loss_std"], b["loss_std"])


def job_results(state: dict) -> list[dict]:
    out = Path(state["out"])
    return [
        read_json(out / "jobs" / f"{slug(key)}.json") for key, job in state["jobs"].items() if job["status"] == "done"
    ]


def summarise(state: dict, results: list[dict]) -> list[dict]:
    """One row per arm with at least one finished job, in the sweep's order, with ``ratio`` (loss / the
    reference arm's) and ``tie`` (see ``is_tie``; None for the reference itself or without stds)."""
    rows = []
    for arm in state["order"]:
        runs = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])
        if not runs:
            continue
        p = state["arms"][arm]
        loss, loss_std = mean_std([r["val_loss"] for r in runs])
        bpb, bpb_std = mean_std([r["val_bpb"] for r in runs])
        rows.append(
            {
                "arm": arm,
                "seeds": [r["seed"] for r in runs],
                "params": p["params"],
                "train_flops": p["train_flops"],
                "forward_flops": statistics.fmean(r["forward_flops"] for r in runs),
                "upper_flops": p["upper_flops"],
                "steps": p["max_steps"],
                "tokens": runs[0]["tokens"],
                "wall_clock_s": statistics.fmean(r["wall_clock_s"] for r in runs),
                "resumed": any(r["resumed_from_step"] is not None for r in runs),
                "loss": loss,
                "loss_std": loss_std,
                "bpb": bpb,
                "bpb_std": bpb_std,
            }
        )
    ref = next((r for r in rows if r["arm"] == state["reference"]), None)
    for row in rows:
        row["ratio"] = row["loss"] / ref["loss"] if ref else None
        row["tie"] = None if ref is None or row is ref else is_tie(row, ref)
    return rows


def pm(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def markdown(state: dict, rows: list[dict]) -> str:
    """The results table with a caption saying what every number is."""
    kind, amount = state["budget"]
    n_seeds = max((len(r["seeds"]) for r in rows), default=0)
    ref = state["reference"]
    head = (
        "| arm | params | train MFLOP/token (measured) | fwd MFLOP/token (measured) | fwd MFLOP/token (config bound) "
        f"| tokens | steps | wall clock (s) | held-out loss | bits/byte | loss / {ref} |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.4f}" + (" (tie)" if r["tie"] else "")
        lines.append(
            f"| {r['arm']} | {r['params'] / 1e6:.2f}M | {r['train_flops'] / 1e6:.2f} | {r['forward_flops'] / 1e6:.2f} "
            f"| {r['upper_flops'] / 1e6:.2f} | {r['tokens']:,} | {r['steps']} | {r['wall_clock_s']:.0f}"
            f"{' (resumed)' if r['resumed'] else ''} | {pm(r['loss'], r['loss_std'])} | {pm(r['bpb'], r['bpb_std'])} "
            f"| {ratio} |"
        )
    caption = (
        f"Budget: {kind} = {amount:g} per arm"
        + (" (training FLOPs: measured FLOPs of a training step per token × tokens)" if kind == "flops" else "")
        + f"; {n_seeds} seed(s), mean ± std; held-out loss in nats/token over the whole validation split. "
        "train MFLOP/token: forward + backward of a training step, measured at initialisation on the first training "
        "batches; fwd (measured): inference forward of the trained model on held-out windows; fwd (config bound): "
        f"the shapes alone. (tie): |loss − {ref}'s| < {TIE_STDS:g}·sqrt(std² + std_{ref}²)."
    )
    failed = [k for k, j in state["jobs"].items() if j["status"] == "failed"]
    notes = [f"Failed jobs: {', '.join(failed)}."] if failed else []
    return "\n".join([*lines, "", caption, *notes]) + "\n"


def mean_curve(results: list[dict], arm: str) -> tuple[list[int], list[float]]:
    """(steps, validation loss averaged over the arm's seeds at each step)."""
    per_step: dict[int, list[float]] = {}
    for r in results:
        if r["arm"] == arm:
            for step, loss in r["curve"]:
                per_step.setdefault(int(step), []).append(loss)
    steps = sorted(per_step)
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def plot(state: dict, rows: list[dict], results: list[dict], path: Path) -> None:
    """Validation loss (the periodic ``val_batches``, mean over seeds) against training FLOPs spent, one line per
    arm; the final whole-split held-out loss as a marker."""
    from train.plotting import figure

    with figure(path, figsize=(7.5, 4.8)) as (fig, ax):
        for row in rows:
            p = state["arms"][row["arm"]]
            per_step = p["tokens_per_step"] * p["train_flops"]  # training FLOPs of one step
            steps, losses = mean_curve(results, row["arm"])
            (line,) = ax.plot([s * per_step for s in steps], losses, label=row["arm"])
            ax.plot([p["max_steps"] * per_step], [row["loss"]], "o", color=line.get_color())
        ax.set_xlabel("training FLOPs (measured per token × tokens)")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"{Path(state['sweep']).stem}: lines = periodic validation, dots = whole held-out split")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def write_report(state: dict) -> tuple[str, list[dict]]:
    """Write results.md, results.json and loss_vs_flops.png into the sweep's folder; -> (table, rows)."""
    out = Path(state["out"])
    results = job_results(state)
    rows = summarise(state, results)
    table = markdown(state, rows)
    atomic_write(out / "results.md", lambda p: Path(p).write_text(table))
    write_json(
        out / "results.json",
        {k: state[k] for k in ("sweep", "budget", "reference")} | {"rows": rows, "runs": results},
    )
    if rows:
        plot(state, rows, results, out / "loss_vs_flops.png")
    return table, rows
