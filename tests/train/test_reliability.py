"""Reliability (#14): runs never share a folder, never keep a diverged checkpoint, stop cleanly on signals, resume
without losing or mixing history; every bad input is one error line before anything is written."""

from __future__ import annotations

import builtins
import contextlib
import csv
import errno
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import train.checkpoint
import train.module
from arch import build_model
from train.checkpoint import CheckpointError, PeriodicCheckpoint, latest_checkpoint, load_trained, read_checkpoint
from train.cli import main
from train.data import ByteTokenizer, load_tokens
from train.errors import Interrupted, NonFiniteLossError
from train.fit import fit
from train.runs import estimate_memory, make_run_dir

from ..conftest import CONFIGS, ROOT, micro_overrides

TINY = str(CONFIGS / "lm/gpt-tiny.yaml")


def ckpt_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def csv_steps(run_dir: Path) -> list[int]:
    """Every step with a train/loss in any of the run's CSV files (first run and resumed segments)."""
    steps = []
    for f in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(f) as fh:
            steps += [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    return sorted(steps)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def run6(tmp_path_factory, cache_dir):
    """One 6-step micro run, checkpoints at steps 3 and 6 (all kept), and what it printed."""
    tmp = tmp_path_factory.mktemp("rel")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = fit(TINY, micro_overrides(tmp, cache_dir, **{"trainer.keep_checkpoints": -1}))
    return result["run_dir"], out.getvalue()


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


# ------------------------------------------------------------------------------------------------ run folders
def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-000000")  # the same second for both
    cfg = {"trainer": {"out_dir": str(tmp_path)}, "name": "x"}
    a, b = make_run_dir(cfg), make_run_dir(cfg)
    assert a != b and a.is_dir() and b.is_dir()  # each created (exclusively) when its name was chosen


class StubStrategy:
    def reduce_boolean_decision(self, decision, all=True):
        return decision


class StubTrainer:
    """What PeriodicCheckpoint uses of a Trainer; ``save_checkpoint`` writes the step as the file's content."""

    is_global_zero, world_size = True, 1

    def __init__(self):
        self.global_step, self.strategy = 0, StubStrategy()
        self.precision_plugin = type("P", (), {"train_step_context": staticmethod(contextlib.nullcontext)})()

    def save_checkpoint(self, path, weights_only=False):
        Path(path).write_text(f"step {self.global_step}")


class StubModule:
    """The module's non-finite flag (``first_bad_step``) and a loss whose value the test sets."""

    def __init__(self):
        self.first_bad_step, self.next_loss, self.global_step = torch.tensor(-1), torch.tensor(1.0), 0

    def loss(self, batch):
        return self.next_loss

    def record_finite(self, loss):
        if not torch.isfinite(loss) and self.first_bad_step < 0:
            self.first_bad_step = torch.tensor(self.global_step)

    def check_finite(self, dropped=None):
        if self.first_bad_step >= 0:
            raise NonFiniteLossError(f"at step {int(self.first_bad_step)}")


def steps(cb, trainer, module, losses):
    """Run training batches with the given losses; the optimizer step follows each batch."""
    for loss in losses:
        module.global_step = trainer.global_step
        module.record_finite(torch.tensor(loss))
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, module, None, "a batch", 0)


def test_an_existing_file_never_stops_a_checkpoint_from_being_written(tmp_path):
    (tmp_path / "step-000002.ckpt").write_text("stale")
    cb, trainer, module = PeriodicCheckpoint(tmp_path, every=2, keep=-1), StubTrainer(), StubModule()
    steps(cb, trainer, module, [1.0, 1.0, 1.0])
    assert (tmp_path / "step-000002.ckpt").read_text() == "step 2"


def test_checkpoints_sort_by_step_number_past_a_million(tmp_path):
    (tmp_path / "step-999999.ckpt").write_text("old")
    assert latest_checkpoint(tmp_path).name == "step-999999.ckpt"
    cb, trainer, module = PeriodicCheckpoint(tmp_path, every=1, keep=1), StubTrainer(), StubModule()
    trainer.global_step = 999_999
    steps(cb, trainer, module, [1.0, 1.0])  # writes step 1,000,000, confirmed by the next loss
    assert ckpt_names(tmp_path) == ["step-1000000.ckpt", "step-1000001.ckpt.unconfirmed"]
    assert latest_checkpoint(tmp_path).name == "step-1000000.ckpt"


def test_a_checkpoint_is_kept_only_once_a_loss_on_its_weights_is_finite(tmp_path):
    cb, trainer, module = PeriodicCheckpoint(tmp_path, every=2, keep=-1), StubTrainer(), StubModule()
    steps(cb, trainer, module, [1.0, 1.0])
    assert ckpt_names(tmp_path) == ["step-000002.ckpt.unconfirmed"]  # written, not yet confirmed
    steps(cb, trainer, module, [1.0, 1.0])  # the loss with step 2's weights was finite
    assert ckpt_names(tmp_path) == ["step-000002.ckpt", "step-000004.ckpt.unconfirmed"]
    with pytest.raises(NonFiniteLossError, match="at step 4"):
        steps(cb, trainer, module, [float("nan")])  # step 4's weights diverged: its checkpoint goes
    assert ckpt_names(tmp_path) == ["step-000002.ckpt"]


@pytest.mark.parametrize("final_loss, kept", [(2.0, ["step-000003.ckpt"]), (float("inf"), [])])
def test_the_final_checkpoint_is_confirmed_by_a_forward_pass(tmp_path, final_loss, kept):
    cb, trainer, module = PeriodicCheckpoint(tmp_path, every=10, keep=-1), StubTrainer(), StubModule()
    steps(cb, trainer, module, [1.0, 1.0, 1.0])
    module.global_step, module.next_loss = 3, torch.tensor(final_loss)  # the loss with the final weights
    with pytest.raises(NonFiniteLossError) if kept == [] else contextlib.nullcontext():
        cb.on_train_end(trainer, module)
    assert ckpt_names(tmp_path) == kept


def test_a_signal_during_training_writes_a_checkpoint_and_stops(tmp_path):
    cb, trainer, module = PeriodicCheckpoint(tmp_path, every=100, keep=-1), StubTrainer(), StubModule()
    steps(cb, trainer, module, [1.0])
    cb._on_signal(signal.SIGTERM, None)
    try:
        with pytest.raises(Interrupted, match="SIGTERM after step 2") as e:
            steps(cb, trainer, module, [1.0])
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert e.value.exit_code == 143 and ckpt_names(tmp_path) == ["step-000002.ckpt"]


# ------------------------------------------------------------------------------------------------ NaN stop
@pytest.mark.parametrize(
    "poison_from, kept", [(4, ["step-000002.ckpt"]), (6, ["step-000002.ckpt", "step-000004.ckpt"])]
)
def test_nan_stop_never_keeps_the_checkpoint_that_diverged(tmp_path, cache_dir, monkeypatch, poison_from, kept):
    """Losses become NaN from ``poison_from``: the checkpoint written just before (whose weights give them) goes,
    including the final one (6), which only a forward pass after training can check."""
    real = train.module.lm_loss

    def poisoned(model, batch):
        loss = real(model, batch)
        return loss * float("nan") if model.global_step >= poison_from else loss

    monkeypatch.setattr(train.module, "lm_loss", poisoned)
    over = {"trainer.max_steps": 6, "trainer.ckpt_every": 2, "trainer.val_every": 100}
    with pytest.raises(NonFiniteLossError, match=f"at step {poison_from}"):
        fit(TINY, micro_overrides(tmp_path, cache_dir, **over))
    (ckpt_dir,) = list((tmp_path / "runs" / "gpt-tiny").glob("*/checkpoints"))
    assert ckpt_names(ckpt_dir) == kept


def test_eval_of_diverged_weights_exits_non_zero(run6, tmp_path, capsys):
    ckpt = torch.load(run6[0] / "checkpoints" / "step-000006.ckpt", weights_only=True)
    ckpt["state_dict"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "diverged.ckpt")
    assert main(["eval", str(tmp_path / "diverged.ckpt"), "data.batch_size=1024"]) == 1
    assert "held-out loss is nan" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ signals
def start_fit(tmp_path: Path, cache_dir: Path) -> subprocess.Popen:
    over = micro_overrides(tmp_path, cache_dir, **{"trainer.max_steps": 10**6, "trainer.val_every": 10**6})
    return subprocess.Popen(
        [sys.executable, "-m", "train", "fit", TINY, *over],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )


def test_sigterm_and_sigint_write_a_checkpoint_and_exit_143_and_130(run6, tmp_path, cache_dir):
    procs = {s: start_fit(tmp_path / s.name, cache_dir) for s in (signal.SIGTERM, signal.SIGINT)}
    deadline = time.time() + 600
    for s, p in procs.items():  # once training has logged, stop it
        while not list((tmp_path / s.name).glob("runs/*/*/tb/events.*")) and p.poll() is None:
            assert time.time() < deadline, "training did not start"
            time.sleep(0.2)
        time.sleep(0.5)
        p.send_signal(s)
    stopped = {}
    for s, p in procs.items():
        err = p.communicate(timeout=300)[1]
        assert p.returncode == 128 + s, err[-3000:]
        (line,) = [x for x in err.splitlines() if x.startswith("interrupted:")]
        m = re.search(rf"{s.name} after step (\d+): wrote (\S+); resume with: .* --resume (\S+)$", line)
        assert m, line
        ckpt, run_dir = Path(m[2]), Path(m[3])
        assert ckpt.parent.parent == run_dir and read_checkpoint(ckpt)["global_step"] == int(m[1])
        stopped[s] = (run_dir, int(m[1]))
    run_dir, step = stopped[signal.SIGTERM]  # the run continues from where it stopped
    over = micro_overrides(tmp_path / "SIGTERM", cache_dir, **{"trainer.max_steps": step + 1})
    assert fit(TINY, over, resume=str(run_dir))["run_dir"] == run_dir
    assert latest_checkpoint(run_dir).name == f"step-{step + 1:06d}.ckpt"


# ------------------------------------------------------------------------------------------------ resume
def test_resume_from_an_older_checkpoint_sets_later_ones_aside_and_keeps_the_csv(run6, tmp_path, cache_dir, capsys):
    run = copy_run(run6[0], tmp_path / "run")
    before = csv_steps(run)
    over = micro_overrides(tmp_path, cache_dir, **{"trainer.max_steps": 4, "trainer.keep_checkpoints": -1})
    fit(TINY, over, resume=str(run / "checkpoints" / "step-000003.ckpt"))
    out = capsys.readouterr().out
    assert ckpt_names(run / "checkpoints") == ["step-000003.ckpt", "step-000004.ckpt"]
    (aside,) = (run / "checkpoints").glob("abandoned-*")
    assert ckpt_names(aside) == ["step-000006.ckpt"] and str(aside) in out
    assert latest_checkpoint(run).name == "step-000004.ckpt"
    assert before == list(range(6)) and csv_steps(run) == sorted([*range(6), 3])  # old history + the new step 3


def test_resume_from_a_loose_checkpoint_starts_a_new_run_folder(run6, tmp_path, cache_dir):
    loose = tmp_path / "downloads" / "ckpt.ckpt"
    loose.parent.mkdir(parents=True)
    shutil.copy(run6[0] / "checkpoints" / "step-000003.ckpt", loose)
    out = fit(TINY, micro_overrides(tmp_path, cache_dir, **{"trainer.max_steps": 4}), resume=str(loose))
    assert out["run_dir"].parent == tmp_path / "runs" / "gpt-tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "runs"]  # nothing in the grandparent
    assert ckpt_names(loose.parent) == ["ckpt.ckpt"]
    assert csv_steps(out["run_dir"]) == [3]


def test_resume_of_a_checkpoint_without_a_saved_config_is_a_clear_error(run6, tmp_path, capsys):
    ckpt = torch.load(run6[0] / "checkpoints" / "step-000003.ckpt", weights_only=True)
    del ckpt["hyper_parameters"]
    torch.save(ckpt, tmp_path / "bare.ckpt")
    assert main(["fit", TINY, f"trainer.out_dir={tmp_path / 'runs'}", "--resume", str(tmp_path / "bare.ckpt")]) == 2
    assert "no saved config" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", "..", "~user"])
def test_name_must_be_a_plain_folder_name(tmp_path, capsys, name):
    assert main(["fit", TINY, f"name={name}", f"trainer.out_dir={tmp_path / 'runs'}"]) == 2
    assert "name: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ writes
def text_source(tmp_path: Path, data: bytes = b"to be or not to be, that is the question. " * 200) -> str:
    (tmp_path / "corpus.txt").write_bytes(data)
    return f"data.source={{type: text, paths: [{tmp_path / 'corpus.txt'}]}}"


def test_a_truncated_token_cache_is_rebuilt(tmp_path, capsys):
    cfg = {"source": {"type": "text", "paths": [str(tmp_path / "c.txt")]}, "tokenizer": "byte"}
    cfg["cache_dir"] = str(tmp_path / "cache")
    (tmp_path / "c.txt").write_text("some text " * 300)
    first = load_tokens(cfg, ByteTokenizer())
    (cache,) = (tmp_path / "cache" / "tokens").iterdir()
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    again = load_tokens(cfg, ByteTokenizer())
    assert f"token cache {cache} is unreadable" in capsys.readouterr().out
    assert np.array_equal(again["train"]["tokens"], first["train"]["tokens"])
    with np.load(cache) as z:  # rebuilt whole
        assert np.array_equal(z["train_tokens"], first["train"]["tokens"])


def fit_error(args, capsys) -> tuple[int, list[str], str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, error_lines(err), err


def test_an_output_folder_that_is_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    args = ["fit", TINY, *micro_overrides(tmp_path, tmp_path / "cache"), text_source(tmp_path)]
    code, lines, err = fit_error([*args, f"trainer.out_dir={tmp_path / 'afile'}"], capsys)
    assert code == 1 and len(lines) == 1 and str(tmp_path / "afile") in lines[0] and "Traceback" not in err
    code, lines, err = fit_error([*args, f"data.cache_dir={tmp_path / 'afile'}"], capsys)
    assert code == 1 and len(lines) == 1 and str(tmp_path / "afile") in lines[0] and "Traceback" not in err


def test_a_read_only_cache_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    import arch.io

    real = arch.io.tempfile.mkstemp

    def mkstemp(dir, **kw):  # what a read-only folder (or a non-root user's folder of root's) does
        if str(dir).startswith(str(tmp_path / "cache")):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(dir=dir, **kw)

    monkeypatch.setattr(arch.io.tempfile, "mkstemp", mkstemp)
    args = ["fit", TINY, *micro_overrides(tmp_path, tmp_path / "cache"), text_source(tmp_path)]
    code, lines, err = fit_error(args, capsys)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert str(tmp_path / "cache" / "tokens") in lines[0] and "Permission denied" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_a_read_only_output_folder_is_one_error_line(tmp_path, capsys, monkeypatch):
    real = os.mkdir

    def mkdir(path, *a, **kw):  # what a read-only mount does (root ignores permission bits, so they cannot)
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    args = ["fit", TINY, *micro_overrides(tmp_path, tmp_path / "cache"), text_source(tmp_path)]
    code, lines, err = fit_error([*args, f"trainer.out_dir={tmp_path / 'ro' / 'runs'}"], capsys)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert str(tmp_path / "ro") in lines[0] and "Read-only file system" in lines[0], lines[0]


class FullDisk(io.RawIOBase):
    """A file on a disk that fills up after ``room`` bytes: a write past it fails with ENOSPC, as write(2) does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)


def test_a_full_disk_is_one_error_line_naming_the_checkpoint(tmp_path, capsys, monkeypatch):
    real = torch.save
    monkeypatch.setattr(train.checkpoint.torch, "save", lambda obj, f, *a, **k: real(obj, FullDisk(f, 4096), *a, **k))
    args = ["fit", TINY, *micro_overrides(tmp_path, tmp_path / "cache"), text_source(tmp_path)]
    code, lines, err = fit_error(args, capsys)
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert re.search(r"checkpoints/step-000003\.ckpt\.unconfirmed: .*No space left on device", lines[0]), lines[0]
    assert list((tmp_path / "runs").glob("*/*/checkpoints/*")) == []  # no partial file left


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=.nan", "optim.lr: nan is not allowed"),
        ("optim.lr=-1", "optim.lr: -1.0 is not allowed"),
        ("optim.betas=[0.9,1.5]", "optim.betas: [0.9, 1.5] is not allowed"),
        ("data.seq_len=0", "data.seq_len: must be >= 1, got 0"),
        ("data.seq_len=-5", "data.seq_len: must be >= 1, got -5"),
        ("data.val_batches=0", "data.val_batches: must be >= 1, got 0"),
        ("seed=1.5", "seed: expected int"),
        ("seed=-1", "seed: must be an integer in [0, 2**32)"),
        ("trainer.accelerator=tpux", "trainer.accelerator: 'tpux' is not allowed; allowed values: auto, cpu"),
        ("trainer.strategy=nope", "trainer.strategy: 'nope' is not allowed; allowed values: auto, ddp"),
        ("trainer.devices=0", "trainer.devices: 0 is not allowed"),
        ("data.tokenizer=TOKFILE", "is not a tokenizers JSON file"),
        ("model.d_model=1000000", "model: too large for this machine"),
        ("model.max_seq_len=100000000", "model: too large for this machine"),
    ],
)
def test_bad_inputs_fail_before_anything_is_built_or_written(tmp_path, cache_dir, capsys, override, message):
    (tmp_path / "tok.txt").write_text("not json\n")
    override = override.replace("TOKFILE", str(tmp_path / "tok.txt"))
    over = [o for o in micro_overrides(tmp_path, cache_dir) if not o.startswith(override.split("=")[0] + "=")]
    if override.startswith("model."):  # the literal sizes on the stock config
        over = [o for o in over if not o.startswith("model.")]
    assert main(["fit", TINY, *over, override]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "runs").exists()


def test_info_warns_about_a_model_too_large_for_memory(capsys):
    assert main(["info", TINY, "model.d_model=1000000"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: too large to train here: training needs about [\d.]+ [TP]iB .* is available", out)


@pytest.mark.parametrize(
    "mixer", ["{type: dense}", "{type: dhsa, budget: 32, query_block: 16, n_init: 4}", "{type: bra, region_size: 16}"]
)
def test_memory_estimate_scales_like_the_tensors_a_real_step_saves(mixer):
    """The estimate (meta-device forwards at short lengths, extrapolated) against the tensors autograd really
    saves for the backward pass of a real batch at full length."""
    from train.config import load_config
    from train.module import lm_loss

    cfg = load_config(TINY, ["data.batch_size=4", f"model.mixer={mixer}"])
    est = estimate_memory(cfg, probe_len=32)["activations"]
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    model = build_model(cfg["model"])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model, torch.randint(0, 256, (4, 129)))
    assert 0.9 < est / saved < 1.1, (est, saved)
    params = sum(p.numel() for p in model.parameters())
    assert estimate_memory(cfg)["params"] == 4 * 4 * params  # fp32 weights, gradients, two Adam moments


@pytest.mark.parametrize("override", ["trainer.sample_prompt=${oc.env:HOME}", "name=${oc.env:HOME}"])
def test_environment_variables_are_refused_in_configs(tmp_path, capsys, override):
    assert main(["fit", TINY, override, f"trainer.out_dir={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err
    assert "oc.env" in err and "refused" in err and str(Path.home()) not in err
    (tmp_path / "c.yaml").write_text(f"base: {TINY}\ntrainer:\n  sample_prompt: ${{oc.env:HOME}}\n")
    assert main(["fit", str(tmp_path / "c.yaml"), f"trainer.out_dir={tmp_path / 'runs'}"]) == 2
    assert "trainer.sample_prompt" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ clear errors
def test_text_that_is_not_utf8_names_the_file_and_offset(tmp_path, capsys):
    data = b"plain text " * 50 + b"\xff\xfe binary" + b" more text" * 50
    args = ["fit", TINY, *micro_overrides(tmp_path, tmp_path / "cache"), text_source(tmp_path, data)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'corpus.txt'} is not UTF-8 text (byte 0xff at offset 550)" in err
    assert "data.source.errors: replace" in err and not (tmp_path / "runs").exists()
    cfg = {"source": {"type": "text", "paths": [str(tmp_path / "corpus.txt")], "errors": "replace"}}
    tokens = load_tokens({**cfg, "tokenizer": "byte", "cache_dir": str(tmp_path / "cache")}, ByteTokenizer())
    text = bytes(np.concatenate([tokens["train"]["tokens"], tokens["validation"]["tokens"]]).astype(np.uint8))
    assert "\ufffd".encode() in text  # the bad bytes read as U+FFFD


def test_broken_model_folders_are_clear_errors(run6, tmp_path, capsys):
    shutil.copytree(run6[0] / "model", tmp_path / "bad")
    (tmp_path / "bad" / "config.yaml").write_text("d_model: [32\n  n_layers: : 2\n")
    assert main(["eval", str(tmp_path / "bad")]) == 2
    assert "config.yaml: not valid YAML" in capsys.readouterr().err
    (tmp_path / "noweights").mkdir()
    shutil.copy(run6[0] / "model" / "config.yaml", tmp_path / "noweights")
    assert main(["eval", str(tmp_path / "noweights")]) == 2
    assert "missing model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "X", "--temperature", "0"], "--temperature: 0.0 is not allowed"),
        (["sample", "X", "--temperature", "nan"], "--temperature: nan is not allowed"),
        (["sample", "X", "--top-k", "0"], "--top-k: 0 is not allowed"),
        (["sample", "X", "--tokens", "-1"], "--tokens: -1 is not allowed"),
        (["bench", TINY, "--steps", "0"], "--steps: 0 is not allowed"),
    ],
)
def test_bad_command_arguments_are_one_error_line(capsys, args, message):
    assert main(args) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith(f"error: {message}")


def test_weights_that_do_not_fit_name_the_first_keys_and_shapes(run6):
    with pytest.raises(CheckpointError) as e:
        load_trained(run6[0], ["model.d_model=64"])
    assert re.search(r"shape mismatch: \S+ \(\d+(, 32)?,?\) in the file, \(\d+(, 64)?,?\) in the model", str(e.value))


def test_a_pickled_payload_is_refused_without_suggesting_weights_only_false(tmp_path, capsys):
    import argparse

    torch.save({"state_dict": {}, "payload": argparse.Namespace(a=1)}, tmp_path / "evil.ckpt")
    assert main(["eval", str(tmp_path / "evil.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "argparse.Namespace" in err
    assert "weights_only" not in err and "can still be loaded" not in err


# ------------------------------------------------------------------------------------------------ newcomer
def test_fit_prints_a_line_per_validation(run6):
    lines = [x for x in run6[1].splitlines() if x.startswith("step ")]
    pattern = r"step (\d)/6: val loss [\d.]+, [\d.]+ bits/byte \| [\d,]+ tokens/s \| elapsed \d+:\d\d \| ETA \d+:\d\d"
    assert [re.fullmatch(pattern, x)[1] for x in lines] == ["3", "6"]


def test_sample_says_what_it_overrode_and_when_a_sparse_mixer_is_dense(run6, capsys):
    assert main(["sample", str(run6[0]), "--tokens", "0", "model.mixer.type=dhsa", "model.mixer.budget=64"]) == 0
    out = capsys.readouterr().out
    (applied,) = [x for x in out.splitlines() if x.startswith("overrides applied to the saved config: ")]
    for change in ("model.mixer.type: dense -> dhsa", "model.mixer.budget: - -> 64", "model.mixer.n_init: - -> 128"):
        assert change in applied
    (warning,) = [x for x in out.splitlines() if x.startswith("warning:")]
    assert "effective density 1.00" in warning and "'dhsa'" in warning
    sparse = ["model.mixer.budget=8", "model.mixer.n_init=4", "model.mixer.n_recent=4", "model.mixer.query_block=8"]
    assert main(["sample", str(run6[0]), "--tokens", "0", "model.mixer.type=dhsa", *sparse]) == 0
    assert "warning:" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "mixer",
    [
        {"type": "dhsa", "budget": 64},
        {"type": "dhsa", "budget": 8, "n_init": 4, "n_recent": 4, "query_block": 8},
        {"type": "dhsa", "budget": 24, "n_init": 0, "n_recent": 0, "query_block": 8},
        {"type": "bra", "region_size": 8, "topk": 1},
        {"type": "bra", "region_size": 8, "topk": 3},
        {"type": "bra", "region_size": 8, "topk": 3, "attend_first": True},
        {"type": "bra", "region_size": 8, "topk": 0, "attend_first": True},
    ],
)
def test_density_one_means_exactly_dense_attention(mixer):
    """A sparse mixer reports density 1 at a length exactly when its output equals dense attention's there."""
    T, cfg = 32, {"d_model": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 64}
    torch.manual_seed(0)
    dense = build_model(cfg)
    sparse = build_model({**cfg, "mixer": mixer})
    sparse.load_state_dict(dense.state_dict(), strict=False)
    x = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        same = torch.allclose(sparse(x), dense(x), atol=1e-5)
    density = sparse.blocks[0].mixer.density(T)
    assert 0 < density <= 1 and same == (density == 1.0), (density, same)


# ------------------------------------------------------------------------------------------------ warnings
def ini_filter_ignores(request, warning) -> bool:
    from _pytest.config import parse_warning_filter

    for entry in request.config.getini("filterwarnings"):
        action, message, category, module, lineno = parse_warning_filter(entry, escape=False)
        if (
            action == "ignore"
            and re.match(message, str(warning.message), re.I)
            and issubclass(warning.category, category)
        ):
            return True
    return False


def test_the_suite_silences_lightnings_leafspec_warning(request):
    from lightning.pytorch.utilities._pytree import _tree_flatten

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(1.0)  # Lightning builds a LeafSpec for a leaf: torch warns
    (leaf,) = [w for w in caught if "LeafSpec" in str(w.message)]
    assert ini_filter_ignores(request, leaf)


def test_the_suite_silences_the_script_method_warning_of_torch_compile(request):
    """torch.compile imports torch.utils.mkldnn (through inductor), whose import warns; the compile test in
    test_fit.py triggered it."""
    r = subprocess.run(
        [sys.executable, "-W", "always", "-c", "import torch.utils.mkldnn"], capture_output=True, text=True
    )
    (line,) = {x for x in r.stderr.splitlines() if "script_method" in x and "Warning:" in x}
    category, message = re.search(r"(\w+Warning): (.*)", line).groups()
    warning = warnings.WarningMessage(message, getattr(builtins, category), "", 0)
    assert ini_filter_ignores(request, warning)


def test_config_error_is_instant_without_lightning():
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "train", "fit", TINY, "optim.lr=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 2 and "optim.lr" in r.stderr
    assert "lightning" not in "".join(x for x in r.stderr.splitlines() if x.startswith("import time"))


# ------------------------------------------------------------------------------------------------ the table
def test_every_case_of_the_before_after_table_has_a_test():
    """tests/train/reliability_cases.py runs the issue's cases as a user would; each row names its test here."""
    from tests.train import reliability_cases

    cases = {n.removeprefix("case_") for n in dir(reliability_cases) if n.startswith("case_")}
    assert cases == set(reliability_cases.TESTS)
    named = {t for tests in reliability_cases.TESTS.values() for t in tests.split(", ")}
    assert named <= {n for n, f in globals().items() if n.startswith("test_") and callable(f)}, named - set(globals())
