"""TokenFormer progressive scaling on the Shakespeare corpus: grown vs from-scratch vs dense.

    python -m train growth-experiment [--steps N] [--more M] [--out docs/tokenformer]

1. train a small TokenFormer (tokenformer-tiny with ¼ of its parameter tokens) for N steps;
2. grow it ×2 and ×4 (exact: same function), continue each for M steps with a fresh schedule;
3. train the ×2 and ×4 shapes from scratch for N+M steps, and a dense Transformer of the ×4 parameter count
   (gpt-tiny) for N+M steps.
Writes ``growth.json`` and ``growth.png`` (validation loss against cumulative training FLOPs) into ``--out``
and prints a markdown table. TokenFormer's claim: the grown model reaches the from-scratch loss at a fraction
of the cost.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from arch import grow, save_pretrained
from train.checkpoint import load_trained
from train.fit import fit
from train.info import forward_flops_per_token
from train.plotting import figure

SLOTS = {1: (48, 192), 2: (96, 384), 4: (192, 768)}  # scale -> (qkv/proj tokens, ffn tokens)
TF_CONFIG, DENSE_CONFIG = "configs/lm/tokenformer-tiny.yaml", "configs/lm/gpt-tiny.yaml"


def slot_overrides(scale: int) -> list[str]:
    qkv, ffn = SLOTS[scale]
    return [f"model.proj.qkv_tokens={qkv}", f"model.proj.proj_tokens={qkv}", f"model.ffn.n_tokens={ffn}"]


def val_curve(run_dir: Path, steps: int) -> list[tuple[int, float]]:
    """[(optimizer steps done, val loss)]; the final `validate` after fit repeats the last point."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        points = {min(int(r["step"]) + 1, steps): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}
    return sorted(points.items())


def flops_per_step(model_cfg: dict, tokens_per_step: int = 32 * 128) -> float:
    """Training FLOPs of one step (3× forward) at gpt-tiny's batch: 32 windows of 128 bytes."""
    return 3 * forward_flops_per_token(model_cfg) * tokens_per_step


def record(name: str, run_dir: Path, steps: int, flops_before: float = 0.0, steps_before: int = 0) -> dict:
    """The validation curve of a run against cumulative FLOPs (offset by the steps and FLOPs before it)."""
    cfg, model = load_trained(run_dir)
    fps = flops_per_step(cfg["model"])
    curve = [(steps_before + s, flops_before + s * fps, loss) for s, loss in val_curve(run_dir, steps)]
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"[growth] {name}: {n_params / 1e6:.2f}M params, val loss {curve[-1][2]:.4f} after {curve[-1][0]} steps, "
        f"{curve[-1][1]:.3g} FLOPs",
        flush=True,
    )
    last = curve[-1]
    return {"run_dir": str(run_dir), "params": n_params, "curve": curve, "final_val_loss": last[2]} | {
        "total_flops": last[1],
        "steps": last[0],
    }


def experiment(N: int, M: int, runs: str) -> dict:
    """Train the small model, grow it ×2 and ×4 and continue each, and train the from-scratch baselines."""
    common = [
        f"trainer.out_dir={runs}",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=0",
        "data.val_batches=20",
        f"trainer.val_every={max(N // 3, 1)}",
        "trainer.log_every=25",
    ]
    small = fit(TF_CONFIG, [*common, *slot_overrides(1), f"trainer.max_steps={N}", "name=tf-small"])
    results = {"small (x1)": record("small (x1)", small["run_dir"], N)}
    small_model = load_trained(small["run_dir"])[1]
    for scale in (2, 4):
        grown_dir = save_pretrained(grow(small_model, scale=scale), Path(small["run_dir"]) / f"grown-x{scale}")
        more = [*common, f"trainer.max_steps={M}", f"optim.warmup_steps={max(M // 100, 1)}"]
        run = fit(TF_CONFIG, [*more, f"name=tf-grown-x{scale}"], init_from=str(grown_dir))
        flops = results["small (x1)"]["total_flops"]
        results[f"grown x{scale}"] = record(f"grown x{scale}", run["run_dir"], M, flops, N)
        scratch = [*common, *slot_overrides(scale), f"trainer.max_steps={N + M}", f"name=tf-scratch-x{scale}"]
        run = fit(TF_CONFIG, scratch)
        results[f"scratch x{scale}"] = record(f"scratch x{scale}", run["run_dir"], N + M)
    run = fit(DENSE_CONFIG, [*common, f"trainer.max_steps={N + M}", "name=dense-scratch"])
    results["dense (gpt-tiny)"] = record("dense (gpt-tiny)", run["run_dir"], N + M)
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=300, help="N: steps of the small model before growing")
    p.add_argument("--more", type=int, default=300, help="M: steps after growing")
    p.add_argument("--out", default="docs/tokenformer")
    p.add_argument("--runs", default="runs/tokenformer-growth")
    p.add_argument(
        "--report-only", action="store_true", help="re-print the table and re-draw the plot from growth.json"
    )


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "growth.json").read_text())
    else:
        results = experiment(args.steps, args.more, args.runs)
        (out / "growth.json").write_text(json.dumps(results, indent=1))
    report(results, out, args.steps)
    return results


def report(results: dict, out: Path, N: int) -> None:
    """Print the table and verdicts, draw growth.png."""
    plot(results, out / "growth.png", N)
    print("\n| model | params | steps | training FLOPs | final val loss (nats/byte) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['total_flops']:.3g} | {r['final_val_loss']:.4f} |"
        )
    for scale in (2, 4):
        g, s = results[f"grown x{scale}"], results[f"scratch x{scale}"]
        reach = flops_to_reach(s["curve"], g["final_val_loss"])
        verdict = (
            (
                f"scratch x{scale} reaches the grown model's final loss at ~{reach:.3g} FLOPs (linear between "
                f"validations); grown spent {g['total_flops']:.3g} ({g['total_flops'] / reach:.2f}x)"
            )
            if reach
            else (f"scratch x{scale} never reaches the grown model's final loss within {s['steps']} steps")
        )
        print(f"x{scale}: grown {g['final_val_loss']:.4f} vs scratch {s['final_val_loss']:.4f}; {verdict}")
    print(f"wrote {out / 'growth.json'} and {out / 'growth.png'}")


def flops_to_reach(curve: list, loss: float) -> float | None:
    """FLOPs at which a (steps, flops, loss) validation curve first reaches ``loss``, linear between points."""
    prev = None
    for _, f, v in curve:
        if v <= loss:
            if prev is None:
                return f
            (f0, v0) = prev
            return f0 + (f - f0) * (v0 - loss) / (v0 - v)
        prev = (f, v)
    return None


def plot(results: dict, path: Path, n_small: int) -> None:
    styles = {
        "small (x1)": "k-",
        "grown x2": "C0-",
        "scratch x2": "C0--",
        "grown x4": "C1-",
        "scratch x4": "C1--",
        "dense (gpt-tiny)": "C2:",
    }
    with figure(path, (7, 4.5)) as (fig, ax):
        for name, r in results.items():
            f = [c[1] for c in r["curve"]]
            loss = [c[2] for c in r["curve"]]
            if name.startswith("grown"):  # draw from the growth point
                small = results["small (x1)"]["curve"][-1]
                f, loss = [small[1]] + f, [small[2]] + loss
            ax.plot(f, loss, styles.get(name, "-"), marker=".", label=f"{name} ({r['params'] / 1e6:.1f}M)")
        ax.set_xlabel("cumulative training FLOPs")
        ax.set_ylabel("validation loss (nats/byte, held-out plays)")
        ax.set_title(f"TokenFormer growth on Shakespeare (grow after {n_small} steps)")
        ax.grid(alpha=0.3)
        ax.legend()
