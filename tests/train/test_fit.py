"""Training: checkpoints, export, determinism, resume, NaN stop, corrupt checkpoints, DDP."""

import csv
import shutil
import subprocess
import sys

import pytest
import torch

import train.module
from train.checkpoint import CheckpointError, load_trained, read_checkpoint
from train.cli import main
from train.errors import NonFiniteLossError
from train.fit import fit

from ..conftest import CONFIGS, ROOT, micro_overrides

TINY = str(CONFIGS / "lm/gpt-tiny.yaml")


def train_losses(run_dir) -> dict[int, float]:
    """{step: train/loss} from the run's CSV log (step = optimizer steps done before the logged batch)."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.fixture(scope="module")
def run8(tmp_path_factory, cache_dir):
    """One 8-step run with a checkpoint every 4 steps, all kept."""
    tmp = tmp_path_factory.mktemp("run8")
    out = fit(
        TINY,
        micro_overrides(
            tmp, cache_dir, **{"trainer.max_steps": 8, "trainer.ckpt_every": 4, "trainer.keep_checkpoints": -1}
        ),
    )
    return out


def test_fit_writes_config_checkpoints_and_export(run8):
    rd = run8["run_dir"]
    assert (rd / "config.yaml").is_file()
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["step-000004.ckpt", "step-000008.ckpt"]
    assert sorted(p.name for p in (rd / "model").iterdir()) == ["config.yaml", "model.safetensors"]
    assert list((rd / "tb").glob("events.out.tfevents.*"))
    assert len(train_losses(rd)) == 8
    assert run8["val_loss"] < 5.6  # below uniform over 256 bytes (ln 256 = 5.55) after 8 steps


def test_checkpoint_and_export_give_same_model(run8):
    rd = run8["run_dir"]
    _, from_ckpt = load_trained(rd)  # newest checkpoint of the run dir
    _, from_export = load_trained(rd / "model")
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(from_ckpt(x), from_export(x))


def test_same_seed_same_curve_and_resume_gives_same_curve(run8, tmp_path, cache_dir):
    ref = train_losses(run8["run_dir"])
    # an identical second run reproduces every loss exactly
    again = fit(
        TINY, micro_overrides(tmp_path / "again", cache_dir, **{"trainer.max_steps": 8, "trainer.ckpt_every": 4})
    )
    assert train_losses(again["run_dir"]) == ref
    # N steps, then resume for N more: identical to the uninterrupted 2N-step run
    loose = tmp_path / "step-000004.ckpt"  # outside a run directory: the resumed run gets a new one
    shutil.copy(run8["run_dir"] / "checkpoints" / "step-000004.ckpt", loose)
    out = fit(
        TINY,
        micro_overrides(tmp_path, cache_dir, **{"trainer.max_steps": 8, "trainer.ckpt_every": 4}),
        resume=str(loose),
    )
    resumed = train_losses(out["run_dir"])
    assert sorted(resumed) == [4, 5, 6, 7]
    assert resumed == {s: ref[s] for s in range(4, 8)}


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
    real = train.module.lm_loss

    def poisoned(model, batch):
        loss = real(model, batch)
        return loss * float("nan") if model.global_step >= 5 else loss

    monkeypatch.setattr(train.module, "lm_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        fit(
            TINY,
            micro_overrides(
                tmp_path, cache_dir, **{"trainer.max_steps": 12, "trainer.ckpt_every": 4, "trainer.log_every": 3}
            ),
        )
    (ckpt_dir,) = list((tmp_path / "runs" / "gpt-tiny").glob("*/checkpoints"))
    assert [p.name for p in ckpt_dir.iterdir()] == ["step-000004.ckpt"]  # no temp files, nothing newer
    state = read_checkpoint(ckpt_dir / "step-000004.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_corrupt_checkpoint_is_a_clear_error(run8, tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes((run8["run_dir"] / "checkpoints" / "step-000008.ckpt").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(bad)
    assert main(["eval", str(bad)]) == 2
    assert "truncated or corrupt checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "junk.ckpt")


def test_checkpoints_load_without_unpickling_code(run8):
    path = run8["run_dir"] / "checkpoints" / "step-000008.ckpt"
    torch.load(path, weights_only=True)  # would raise if the checkpoint needed arbitrary unpickling


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mixer.type=sparse", "model.mixer.type: unknown mixer 'sparse'"),
        ("model.d_model=30", "model.d_model: 30 is not divisible"),
        ("trainer.max_stepz=3", "trainer.max_stepz: unknown key"),
        ("data.source.type=wiki", "data.source.type: unknown data source 'wiki'"),
        ("data.seq_len=999", "data.seq_len: 999 exceeds model.max_seq_len"),
        ("optimizer.lr=1", "optimizer: unknown top-level key"),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, capsys, override, message):
    code = main(["fit", TINY, override, f"trainer.out_dir={tmp_path / 'runs'}"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_config_inheritance_and_interpolation(tmp_path):
    from train.config import load_config

    (tmp_path / "child.yaml").write_text(f"base: {TINY}\nmodel:\n  n_layers: 2\ndata:\n  batch_size: 7\n")
    cfg = load_config(tmp_path / "child.yaml", ["model.max_seq_len=64"])
    assert cfg["model"]["n_layers"] == 2 and cfg["model"]["d_model"] == 256  # inherited
    assert cfg["data"]["seq_len"] == 64  # ${model.max_seq_len} resolved after the override
    assert cfg["name"] == "child"


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_replicas_in_sync(tmp_path, cache_dir):
    cmd = [
        sys.executable,
        "-m",
        "train",
        "fit",
        TINY,
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        *micro_overrides(tmp_path, cache_dir, **{"trainer.max_steps": 4}),
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "replicas in sync across 2 processes" in r.stdout + r.stderr


@pytest.mark.slow
def test_compile_and_bf16_options_train_and_checkpoint_plain_weights(tmp_path, cache_dir):
    out = fit(
        TINY,
        micro_overrides(
            tmp_path, cache_dir, **{"trainer.compile": True, "trainer.precision": "bf16-mixed", "trainer.max_steps": 2}
        ),
    )
    state = read_checkpoint(out["run_dir"])["state_dict"]
    assert state and all(k.startswith("model.") for k in state)  # no compiled-wrapper duplicate
    assert out["val_loss"] < 6.0
