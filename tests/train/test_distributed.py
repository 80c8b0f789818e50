"""Several processes: the global batch is the same whatever the number of processes, FSDP (sharded) training of
the hybrid model on 2 CPU processes gives the losses of one process with the same global batch, and its
checkpoint resumes under DDP and under one process."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.checkpoint import load_trained
from train.evaluate import mean_loss
from train.fit import fit
from train.info import heldout_batches

from ..conftest import ROOT, micro_overrides
from .studies.compare.test_hybrid import HYBRID, SMALL


def train_losses(run_dir) -> dict[int, float]:
    losses = {}
    for path in [run_dir / "csv" / "metrics.csv", *sorted(run_dir.glob("csv/*/metrics.csv"))]:  # resumed segments
        if path.is_file():
            with open(path) as f:
                losses |= {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    return losses


def launch(args: list[str]) -> str:
    """``python -m train <args>`` in a new process (Lightning starts the other ranks); its output. One thread per
    process: two processes of two threads on two cores spin in OpenMP barriers (README)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "train", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def run_dir(out: Path) -> Path:
    (found,) = (out / "hybrid-tiny").iterdir()
    return found


def resume_copy(ckpt, folder):
    """A run dir holding only ``ckpt`` and the run's config (a resume continues in the checkpoint's run dir)."""
    (folder / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, folder / "checkpoints")
    shutil.copy(ckpt.parent.parent / "config.yaml", folder)
    return folder / "checkpoints" / ckpt.name


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_matches_one_process_and_resumes_under_ddp_and_one(tmp_path, cache_dir):
    # 6 steps, a full checkpoint every 3 (all kept); 2 windows per process, so one process takes 4
    over = micro_overrides(tmp_path, cache_dir, **SMALL, **{"trainer.keep_checkpoints": -1})
    one = fit(HYBRID, over + ["data.batch_size=4", f"trainer.out_dir={tmp_path / 'one'}"])["run_dir"]
    two = ["trainer.devices=2", "trainer.accelerator=cpu"]
    launch(["fit", HYBRID, *over, *two, "trainer.strategy=fsdp", f"trainer.out_dir={tmp_path / 'fsdp'}"])
    sharded = run_dir(tmp_path / "fsdp")
    ref, got = train_losses(one), train_losses(sharded)
    assert sorted(got) == list(range(6))
    for step in range(6):  # the global batch's loss (mean over both processes) at every step
        assert got[step] == pytest.approx(ref[step], abs=2e-5), step
    assert abs(ref[5] - ref[0]) > 0.1  # the model did learn: the comparison could see a difference

    cfg, model_one = load_trained(one)
    _, model_fsdp = load_trained(sharded / "model")  # gathered from the shards at the end of fit
    windows = heldout_batches(cfg, 8)
    assert mean_loss(model_fsdp, windows)["loss"] == pytest.approx(mean_loss(model_one, windows)["loss"], abs=1e-4)

    # the FSDP checkpoint is one full file: it resumes under one process and under DDP, continuing the same curve
    ckpt = sharded / "checkpoints" / "step-000003.ckpt"
    assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["state_dict"]["model.tok_emb.weight"].dim() == 2
    resumed = resume_copy(ckpt, tmp_path / "resumed-one")
    fit(HYBRID, over + ["data.batch_size=4"], resume=str(resumed))
    resumed_ddp = resume_copy(ckpt, tmp_path / "resumed-ddp")
    out = launch(["fit", HYBRID, *over, *two, "trainer.strategy=ddp", "--resume", str(resumed_ddp)])
    assert "replicas in sync across 2 processes" in out
    resumed = {folder: train_losses(tmp_path / folder) for folder in ("resumed-one", "resumed-ddp")}
    print("\nstep | one process (batch 4) | FSDP, 2 processes (2 each) | |diff| | FSDP ckpt 3 -> one | -> DDP")
    for step in range(6):
        after = [f"{resumed[f][step]:.6f}" if step in resumed[f] else "" for f in resumed]
        print(f"{step} | {ref[step]:.6f} | {got[step]:.6f} | {abs(got[step] - ref[step]):.1e} | " + " | ".join(after))
    for folder, losses in resumed.items():
        assert sorted(losses) == [3, 4, 5], folder
        for step in (3, 4, 5):
            assert losses[step] == pytest.approx(ref[step], abs=2e-5), (folder, step)
