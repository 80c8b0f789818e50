"""Train every arm of a sweep to the same compute budget and compare them (table, JSON, plot, TensorBoard).

    python -m train compare configs/sweeps/mechanisms-tiny.yaml [--seeds K] [--parallel N] [--out DIR]
                            [--budget KIND=AMOUNT] [--plan] [dotted.key=value ...]

The sweep file names a base config, the arms (config files and/or override sets; list values expand into one
arm each) and one budget: ``flops`` (training FLOPs: the FLOPs per token a training step executes, measured on
the live routes and selections at initialisation, × tokens), ``tokens`` or ``wall_clock`` (seconds of training,
converted to steps with each arm's step time measured first). Every arm trains on the same batches with the same
seed (seed + k for the k-th of ``--seeds``), is evaluated on the whole held-out split, and its forward FLOPs are
measured on held-out windows after training. Writes into DIR (default runs/compare/<sweep name>): results.md,
results.json, loss_vs_flops.png, runs/ (every job's run dir: ``tensorboard --logdir DIR/runs``), state.json.
Run the same command again to resume an interrupted sweep: finished jobs are kept, an interrupted one resumes
from its newest checkpoint. See docs/compare.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from arch.registry import ConfigError

from .sweep import load_sweep


def compare(
    sweep_path: str,
    seeds: int = 1,
    parallel: int = 1,
    out: str | None = None,
    plan_only: bool = False,
    budget: str | None = None,
    overrides: Iterable[str] = (),
) -> list[dict]:
    """Plan, run (or resume) and report a sweep; -> the table's rows. ``plan_only``: measure and print every
    arm's steps and step time, write nothing, train nothing. ``budget``: ``KIND=AMOUNT`` instead of the file's;
    ``overrides``: ``key=value`` for every arm (e.g. ``trainer.accelerator=gpu``)."""
    from .report import write_report
    from .runner import add_jobs, load_state, plan, run_parallel, run_sequential, save

    if seeds < 1 or parallel < 1:
        raise ConfigError(f"--seeds ({seeds}) and --parallel ({parallel}) must be >= 1")
    sweep = load_sweep(sweep_path, budget, overrides)
    out_dir = Path(out) if out else Path("runs") / "compare" / sweep.name
    kind, amount = sweep.budget
    print(f"compare {sweep.path.name}: {len(sweep.arms)} arms x {seeds} seed(s), budget {kind} = {amount:g} per arm")
    if plan_only:
        print("  plan only (nothing is written): measured FLOPs, steps and step time of every arm")
        plan(sweep, {"out": str(out_dir)}, time_steps=True)
        return []
    print(f"  output: {out_dir} (state.json, results.md/.json, loss_vs_flops.png, runs/ for TensorBoard)")
    state = load_state(sweep, out_dir.resolve())
    plan(sweep, state)
    todo = add_jobs(state, seeds)
    save(state)
    done = len(state["jobs"]) - len(todo)
    print(f"  {len(todo)} job(s) to run" + (f", {done} already done (kept)" if done else ""))
    if parallel > 1:
        run_parallel(state, todo, parallel)
    else:
        run_sequential(state, todo)
    table, rows = write_report(state)
    print("\n" + table)
    print(f"wrote {out_dir / 'results.md'}, {out_dir / 'results.json'}, {out_dir / 'loss_vs_flops.png'}")
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="sweep YAML (see configs/sweeps/)")
    p.add_argument("overrides", nargs="*", help="config overrides for every arm, dotted.key=value")
    p.add_argument("--seeds", type=int, default=1, help="repeat every arm with K seeds; mean ± std, ties marked")
    p.add_argument("--parallel", type=int, default=1, help="run N jobs at once, each in its own process")
    p.add_argument("--out", help="output folder (default runs/compare/<sweep name>); reuse it to resume")
    p.add_argument("--plan", action="store_true", help="only measure and print each arm's steps and step time")
    p.add_argument("--budget", metavar="KIND=AMOUNT", help="replace the sweep's budget, e.g. flops=2e12 (a short run)")


def run(args: argparse.Namespace) -> None:
    rows = compare(args.target, args.seeds, args.parallel, args.out, args.plan, args.budget, args.overrides)
    if not rows and not args.plan:
        raise ConfigError("compare: no job finished; see the messages above")
