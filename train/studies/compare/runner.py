"""Running a sweep: plan every arm's steps from the budget, run every (arm, seed) job once, resume after a stop.

The sweep's output folder holds::

    state.json           the plan of every arm and the status of every job (written atomically after each change)
    jobs/<job>.json      a finished job's results (written atomically by the job: a job is done when it exists)
    runs/<job>/<time>/   each job's run dir (config, checkpoints, model, tb/, csv/): ``tensorboard --logdir runs``
    logs/<job>.log       the output of jobs run as separate processes (``--parallel``)

A job is one arm trained with one seed, in a run folder of its own (its name is the job's). When a sweep is run
again on the same folder, finished jobs are skipped and an interrupted job resumes from its newest checkpoint;
the plan (steps per arm) is reused, and an arm whose config changed since is an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from arch import build_model
from arch.io import atomic_write
from arch.registry import ConfigError
from train.config import load_config
from train.errors import Interrupted
from train.info import count_params, forward_flops_per_token, heldout_batches, measured_flops_per_token

from .sweep import Arm, Sweep, check_same_data

MEASURE_BATCHES = 2  # training batches the training FLOPs are measured on
MEASURE_WINDOWS = 8  # held-out windows the trained model's forward FLOPs are measured on
TIMED_STEPS, WARMUP_STEPS = 5, 2  # wall_clock budgets: the step time is measured on this many steps


# --------------------------------------------------------------------------------------------- state
def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=1, default=str)))


def job_key(arm: str, seed_index: int) -> str:
    return f"{arm}/seed{seed_index}"


def slug(key: str) -> str:
    """A job key as a file or folder name: 'dhsa.budget=128/seed0' -> 'dhsa.budget=128-seed0'."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", key.replace("/", "-"))


def fingerprint(cfg: dict) -> str:
    return hashlib.sha1(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- planning
def world_size(trainer: dict) -> int:
    return trainer["devices"] if isinstance(trainer["devices"], int) else 1


def train_batches(cfg: dict, n: int) -> list[torch.Tensor]:
    """The first ``n`` training batches of a run of ``cfg`` (``fit``'s, in order): [B, T + 1] each."""
    from train.data import TrainWindows, build_tokenizer, load_tokens

    d = cfg["data"]
    tokens = load_tokens(d, build_tokenizer(d["tokenizer"]))["train"]["tokens"]
    windows = TrainWindows(tokens, d["seq_len"], d["batch_size"], cfg["seed"], 0, n)
    return [windows[i] for i in range(n)]


def step_seconds(cfg: dict) -> float:
    """Seconds per optimizer step of ``cfg``'s training loop on this machine (``bench``'s bare loop)."""
    from train.bench import bare_loop
    from train.datamodules import LMDataModule
    from train.runs import device_for

    data = LMDataModule(cfg)
    data.setup()
    return bare_loop(cfg, data, device_for(cfg["trainer"]["accelerator"]), TIMED_STEPS, WARMUP_STEPS) / TIMED_STEPS


def steps_for(budget: tuple[str, float], train_flops: float, tokens_per_step: int, step_s: float | None) -> int:
    """Optimizer steps that spend ``budget``: training FLOPs (measured per token × tokens), tokens, or seconds."""
    kind, amount = budget
    per_step = {"flops": train_flops * tokens_per_step, "tokens": tokens_per_step, "wall_clock": step_s}[kind]
    steps = int(round(amount / per_step)) if kind != "wall_clock" else int(amount // per_step)
    if steps < 1:
        raise ConfigError(f"budget.{kind}: {amount:g} buys no training step ({per_step:.4g} per step)")
    return steps


def plan_arm(arm: Arm, cfg: dict, budget: tuple[str, float], time_steps: bool = False) -> dict:
    """Measure an arm at initialisation (its first seed) and turn the budget into its number of steps; its step
    time is measured for a ``wall_clock`` budget or when ``time_steps``."""
    d, tr = cfg["data"], cfg["trainer"]
    tokens_per_step = d["batch_size"] * d["seq_len"] * tr["accumulate_grad_batches"] * world_size(tr)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg["model"])
    train_flops = measured_flops_per_token(model, train_batches(cfg, MEASURE_BATCHES), train=True)
    step_s = step_seconds(cfg) if budget[0] == "wall_clock" or time_steps else None
    steps = steps_for(budget, train_flops, tokens_per_step, step_s)
    return {
        "config": arm.config,
        "overrides": arm.overrides,
        "fingerprint": fingerprint(cfg),
        "seed": cfg["seed"],
        "params": count_params(model)["total"],
        "upper_flops": forward_flops_per_token(cfg["model"], d["seq_len"]),
        "train_flops": train_flops,
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "max_steps": steps,
    }


def plan(sweep: Sweep, state: dict, time_steps: bool = False) -> dict:
    """Plan every arm not planned yet (checking the planned ones still have the same config); prints the plan."""
    configs = {arm.name: load_config(arm.config, arm.overrides) for arm in sweep.arms}
    check_same_data(configs)
    arms = state.setdefault("arms", {})
    for arm in sweep.arms:
        old = arms.get(arm.name)
        if old is not None and old["fingerprint"] != fingerprint(configs[arm.name]):
            raise ConfigError(
                f"arm {arm.name}: its config changed since {state['out']} was written; "
                "give the sweep another --out (or delete that folder)"
            )
        if old is None:
            arms[arm.name] = plan_arm(arm, configs[arm.name], sweep.budget, time_steps)
        p = arms[arm.name]
        timed = f", {p['step_s']:.3f} s/step: {p['step_s'] * p['max_steps']:.0f} s of training" if p["step_s"] else ""
        print(
            f"  {arm.name}: {p['params'] / 1e6:.2f}M params, {p['train_flops'] / 1e6:.2f} MFLOP/token per training "
            f"step (measured), {p['max_steps']} steps of {p['tokens_per_step']} tokens{timed}",
            flush=True,
        )
    return state


# --------------------------------------------------------------------------------------------- one job
def job_overrides(state: dict, key: str) -> list[str]:
    job = state["jobs"][key]
    p = state["arms"][job["arm"]]
    every = max(1, p["max_steps"] // state["val_points"])
    runs = Path(state["out"]) / "runs"
    return [
        *p["overrides"],
        f"name={json.dumps(slug(key))}",
        f"seed={job['seed']}",
        f"trainer.out_dir={json.dumps(str(runs))}",
        f"trainer.max_steps={p['max_steps']}",
        f"trainer.val_every={every}",
        f"trainer.ckpt_every={every}",
        "trainer.keep_checkpoints=1",
        "trainer.sample_tokens=0",
        "trainer.progress_bar=false",
    ]


def interrupted_run(out: Path, key: str) -> Path | None:
    """The newest run dir of ``key`` that holds a checkpoint (an earlier attempt that stopped), or None."""
    found = sorted((out / "runs" / slug(key)).glob("*/checkpoints/step-*.ckpt"))
    return found[-1].parent.parent if found else None


def val_curve(run_dir: Path, steps: int) -> list[list[float]]:
    """[[optimizer steps done, val/loss], ...] from a run's CSV log (a validation inside the loop is logged at the
    step before; the ``validate`` after ``fit`` at ``steps``)."""
    import csv

    rows = []
    # the first attempt's csv/metrics.csv, then each resumed segment's csv/from-step-<step>-<time>/ in order
    for path in [run_dir / "csv" / "metrics.csv", *sorted(run_dir.glob("csv/*/metrics.csv"))]:
        if path.is_file():
            with open(path) as f:
                rows += [
                    (min(int(r["step"]) + 1, steps), float(r["val/loss"]))
                    for r in csv.DictReader(f)
                    if r.get("val/loss")
                ]
    return [list(r) for r in sorted(dict(rows).items())]


def run_job(out: Path, key: str) -> dict:
    """Train one job (resuming an interrupted attempt), evaluate it on the whole held-out split, measure its
    forward FLOPs on held-out windows, and write ``jobs/<job>.json``."""
    from train.checkpoint import latest_checkpoint, load_trained
    from train.datamodules import LMDataModule
    from train.evaluate import evaluate_model
    from train.fit import fit

    state = read_json(out / "state.json")
    job = state["jobs"][key]
    p = state["arms"][job["arm"]]
    resume = interrupted_run(out, key)
    resumed_from = int(latest_checkpoint(resume).stem.split("-")[1]) if resume else None
    t0 = time.perf_counter()
    result = fit(p["config"], job_overrides(state, key), resume=str(resume) if resume else None)
    wall = time.perf_counter() - t0
    cfg, model = load_trained(result["run_dir"])  # its final checkpoint: the weights and the whole config
    data = LMDataModule(cfg, full_validation=True)
    data.setup()
    heldout = evaluate_model(model, data, progress=False)
    out_row = {
        "key": key,
        "arm": job["arm"],
        "seed": job["seed"],
        "run_dir": str(result["run_dir"]),
        "steps": p["max_steps"],
        "tokens": p["max_steps"] * p["tokens_per_step"],
        "wall_clock_s": wall,
        "resumed_from_step": resumed_from,
        "val_loss": heldout["loss"],
        "val_bpb": heldout["bpb"],
        "eval_tokens": heldout["tokens"],
        "forward_flops": measured_flops_per_token(model, heldout_batches(cfg, MEASURE_WINDOWS)),
        "curve": val_curve(Path(result["run_dir"]), p["max_steps"]),  # every segment of a resumed run
    }
    write_json(out / "jobs" / f"{slug(key)}.json", out_row)
    return out_row


# --------------------------------------------------------------------------------------------- the sweep
def load_state(sweep: Sweep, out: Path) -> dict:
    """The sweep's state: read from ``out`` if the sweep was started there, else a new one."""
    path = out / "state.json"
    state = read_json(path) if path.is_file() else {"sweep": str(sweep.path), "out": str(out), "jobs": {}}
    if state.get("budget", list(sweep.budget)) != list(sweep.budget):
        raise ConfigError(f"budget: {out} holds a sweep with budget {state['budget']}; give another --out")
    state.update(budget=list(sweep.budget), reference=sweep.reference, val_points=sweep.val_points)
    state["order"] = [a.name for a in sweep.arms]
    return state


def add_jobs(state: dict, seeds: int) -> list[str]:
    """Register the jobs of ``seeds`` seeds; -> the keys of those not done (a job is done when its result file
    exists), in order: seed by seed, arm by arm."""
    out, todo = Path(state["out"]), []
    for k in range(seeds):
        for arm in state["order"]:
            key = job_key(arm, k)
            job = state["jobs"].setdefault(key, {"arm": arm, "seed": state["arms"][arm]["seed"] + k})
            done = (out / "jobs" / f"{slug(key)}.json").is_file()
            job["status"] = "done" if done else "pending"
            if not done:
                todo.append(key)
    return todo


def save(state: dict) -> None:
    write_json(Path(state["out"]) / "state.json", state)


def finish(state: dict, key: str, error: str | None = None) -> None:
    out = Path(state["out"])
    done = (out / "jobs" / f"{slug(key)}.json").is_file()
    state["jobs"][key]["status"] = "done" if done else "failed"
    if not done:
        state["jobs"][key]["error"] = error or "no result written"
    save(state)
    print(f"  {key}: {state['jobs'][key]['status']}" + ("" if done else f" ({state['jobs'][key]['error']})"))


def run_sequential(state: dict, keys: list[str]) -> None:
    """One job after another, in this process."""
    for key in keys:
        state["jobs"][key]["status"] = "running"
        save(state)
        print(f"\n== {key}: {state['arms'][state['jobs'][key]['arm']]['max_steps']} steps")
        try:
            run_job(Path(state["out"]), key)
        except (KeyboardInterrupt, Interrupted):  # Ctrl-C / SIGTERM: the job checkpointed; rerun to resume
            state["jobs"][key]["status"] = "pending"
            save(state)
            raise
        except Exception as e:  # one failed arm does not stop the others; the report lists it
            finish(state, key, f"{type(e).__name__}: {e}")
            continue
        finish(state, key)


def run_parallel(state: dict, keys: list[str], n: int) -> None:
    """``n`` jobs at a time, each in its own process (``python -m train.studies.compare.worker``), its output in
    ``logs/<job>.log``. Each process gets cpu_count // n threads unless OMP_NUM_THREADS is set."""
    out = Path(state["out"])
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    pending, running = list(keys), {}
    try:
        while pending or running:
            while pending and len(running) < n:
                key = pending.pop(0)
                log = out / "logs" / f"{slug(key)}.log"
                cmd = [sys.executable, "-m", "train.studies.compare.worker", str(out), key]
                with open(log, "w") as f:
                    running[key] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
                state["jobs"][key]["status"] = "running"
                save(state)
                print(f"  {key}: started (pid {running[key].pid}, log {log})")
            time.sleep(0.5)
            for key, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[key]
                    finish(state, key, f"exit code {proc.returncode}, see logs/{slug(key)}.log")
    finally:
        for key, proc in running.items():  # interrupted: stop the jobs this sweep started
            proc.terminate()
            proc.wait()
            state["jobs"][key]["status"] = "pending"
        if running:
            save(state)
