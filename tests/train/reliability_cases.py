"""The issue-14 (reliability) cases as a user and a scheduler produce them, run against a source tree, and the
before/after table of the closing note. Each case has a test in tests/train/test_reliability.py (``TESTS``).

    python -m tests.train.reliability_cases run TREE OUT.jsonl [CASE ...]   # one JSON line per case
    python -m tests.train.reliability_cases table BEFORE.jsonl[,...] AFTER.jsonl[,...]  # the markdown table

``run`` starts ``python -m train`` in TREE (its own packages first on PYTHONPATH) with micro runs of
configs/lm/gpt-tiny.yaml; the read-only and full-disk cases mount small tmpfs folders (root only). Several
minutes per case on a 2-core CPU: run it in the background.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import micro_overrides

TREE: Path = Path(".")
WORK: Path = Path(".")
CACHE: Path = Path(".")
TINY = "configs/lm/gpt-tiny.yaml"
LIMIT = "ulimit -v 16000000; "  # 16 GB of address space: a huge model fails instead of swamping the machine


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(TREE), "PYTHONUNBUFFERED": "1", "SECRET_TOKEN": "hunter2"}


def micro(w: Path, **extra) -> list[str]:
    return micro_overrides(w, CACHE, **extra)


def T(*args) -> list[str]:
    return [sys.executable, "-m", "train", *map(str, args)]


def sh(cmd, timeout=900, shell=False) -> dict:
    """Run a command in TREE; its exit code, first lines, the ``error:`` line and the tails of its output."""
    t0 = time.time()
    r = subprocess.run(
        cmd,
        cwd=TREE,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        shell=shell,
        executable="/bin/bash" if shell else None,
    )
    out = [x for x in r.stdout.splitlines() if x.strip()]
    err = [x for x in r.stderr.splitlines() if x.strip()]
    return {
        "cmd": cmd if shell else shlex.join(cmd),
        "rc": r.returncode,
        "stdout1": out[0] if out else "",
        "stderr1": err[0] if err else "",
        "stderr_last": err[-1] if err else "",
        "error_line": next((x for x in err if x.startswith("error:")), ""),
        "warning_lines": [x for x in out + err if x.lower().startswith("warning")][:3],
        "seconds": round(time.time() - t0, 1),
        "stdout": r.stdout[-3000:],
        "stderr": r.stderr[-3000:],
    }


def q(args) -> str:
    return shlex.join(args)


def fresh(name: str) -> Path:
    w = WORK / name
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    return w


def runs_of(w: Path) -> list[str]:
    return sorted(str(p.relative_to(w)) for p in w.glob("**/config.yaml"))


def trained_run() -> Path:
    w = WORK / "base"
    found = sorted(w.glob("runs/gpt-tiny/*/model/model.safetensors"))
    if found:
        return found[-1].parent.parent
    w = fresh("base")
    r = sh(T("fit", TINY, *micro(w, **{"trainer.keep_checkpoints": -1})))
    assert r["rc"] == 0, r
    return sorted(w.glob("runs/gpt-tiny/*"))[-1]


# ------------------------------------------------------------------------------------------------ cases
def case_concurrent():
    w = fresh("concurrent")
    args = T("fit", TINY, *micro(w))
    procs = [subprocess.Popen(args, cwd=TREE, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    procs.append(subprocess.Popen(args, cwd=TREE, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    dirs = sorted(p.name for p in (w / "runs" / "gpt-tiny").iterdir())
    first = [o[0].splitlines()[0] if o[0] else o[1].splitlines()[-1] for o in outs]
    run_lines = [next((x for x in o[0].splitlines() if "run dir" in x), "") for o in outs]
    return {
        "cmd": "2x (at once) " + q(args),
        "rc": [p.returncode for p in procs],
        "stdout1": first,
        "run_dirs": dirs,
        "run_lines": run_lines,
    }


def case_nan_fit():
    w = fresh("nan")
    over = {"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.grad_clip": 0, "trainer.ckpt_every": 1}
    r = sh(T("fit", TINY, *micro(w, **over)))
    ck = sorted(w.glob("runs/gpt-tiny/*/checkpoints/*.ckpt"))
    r["checkpoints"] = [p.name for p in ck]
    if ck:
        import torch

        sd = torch.load(ck[-1], weights_only=True)["state_dict"]
        r["kept_max_abs_weight"] = max(float(v.abs().max()) for v in sd.values() if v.is_floating_point())
    return r


def case_nan_eval():
    w = WORK / "nan"
    w.mkdir(parents=True, exist_ok=True)
    ck = sorted(w.glob("runs/gpt-tiny/*/checkpoints/*.ckpt"))
    if not ck:  # after the fix nothing diverged is kept: write one with exploded weights by hand
        import torch

        src = sorted(trained_run().glob("checkpoints/*.ckpt"))[-1]
        c = torch.load(src, weights_only=True)
        for k, v in c["state_dict"].items():
            if v.is_floating_point():
                c["state_dict"][k] = v * 1e30
        ck = [w / "exploded.ckpt"]
        torch.save(c, ck[0])
    r = sh(T("eval", ck[-1], "data.batch_size=1024"))
    r["target"] = str(ck[-1].relative_to(WORK))
    return r


def case_nan_eval_diverged():
    import torch

    w = fresh("diverged")
    src = sorted(trained_run().glob("checkpoints/*.ckpt"))[-1]
    c = torch.load(src, weights_only=True)
    c["state_dict"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in c["state_dict"].items()}
    torch.save(c, w / "diverged.ckpt")
    return sh(T("eval", w / "diverged.ckpt", "data.batch_size=1024"))


def _signal(sig):
    w = fresh(f"sig{int(sig)}")
    args = T(
        "fit", TINY, *micro(w, **{"trainer.max_steps": 100000, "trainer.val_every": 1000, "trainer.ckpt_every": 1000})
    )
    p = subprocess.Popen(
        args,
        cwd=TREE,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    t0 = time.time()
    for line in p.stdout:
        lines.append(line.rstrip())
        if "run dir" in line:
            break
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and not list(w.glob("runs/gpt-tiny/*/csv/*.csv"))
        and not list(w.glob("runs/gpt-tiny/*/tb/events*"))
    ):
        time.sleep(0.5)
    time.sleep(15)
    p.send_signal(sig)
    rest = p.communicate(timeout=600)[0]
    lines += [x for x in rest.splitlines()]
    lines = [x for x in lines if x.strip()]
    after = [x for x in rest.splitlines() if x.strip()]
    return {
        "cmd": f"{q(args)}  # then kill -{sig.name}",
        "rc": p.returncode,
        "stdout1": after[0] if after else "",
        "last_lines": after[-4:],
        "checkpoints": sorted(str(x.relative_to(w)) for x in w.glob("runs/gpt-tiny/*/checkpoints/*")),
        "exported": bool(list(w.glob("runs/gpt-tiny/*/model/model.safetensors"))),
        "seconds": round(time.time() - t0),
    }


def case_sigterm():
    return _signal(signal.SIGTERM)


def case_sigint():
    return _signal(signal.SIGINT)


def _six_step_run(w: Path) -> Path:
    r = sh(T("fit", TINY, *micro(w, **{"trainer.keep_checkpoints": -1})))
    assert r["rc"] == 0, r
    return sorted(w.glob("runs/gpt-tiny/*"))[-1]


def _csv_steps(run: Path) -> list:
    """Every step with a train/loss row in any of the run's CSV files (a resumed segment's included)."""
    import csv

    steps = []
    for f in sorted(run.glob("csv/**/*.csv")):
        with open(f) as fh:
            steps += [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss")]
    return sorted(steps)


def case_resume_older():
    w = fresh("resume_older")
    run = _six_step_run(w)
    r = sh(
        T(
            "fit",
            TINY,
            *micro(w, **{"trainer.max_steps": 4, "trainer.keep_checkpoints": -1}),
            "--resume",
            run / "checkpoints/step-000003.ckpt",
        )
    )
    r["checkpoints_after"] = sorted(str(p.relative_to(run)) for p in run.glob("checkpoints/**/*.ckpt"))
    r["csv_steps_after"] = _csv_steps(run)
    r["latest_checkpoint"] = sorted(str(p.relative_to(run)) for p in run.glob("checkpoints/*.ckpt"))[-1:]
    return r


def case_resume_loose():
    w = fresh("resume_loose")
    run = _six_step_run(w)
    (w / "loose").mkdir()
    shutil.copy(run / "checkpoints/step-000003.ckpt", w / "loose/step-000003.ckpt")
    r = sh(T("fit", TINY, *micro(w), "--resume", w / "loose/step-000003.ckpt"))
    r["written_into_grandparent"] = sorted(p.name for p in w.iterdir())
    r["run_line"] = next((x for x in r["stdout"].splitlines() if "run dir" in x), "")
    return r


def case_step_million():
    w = fresh("million")
    code = (
        "import sys; from pathlib import Path; from train.checkpoint import latest_checkpoint;"
        f"d=Path('{w}'); [(d/n).write_bytes(b'') for n in ('step-999999.ckpt','step-1000000.ckpt')];"
        "print('latest:', latest_checkpoint(d).name)"
    )
    return sh([sys.executable, "-c", code])


def case_name_escape():
    w = fresh("name")
    r = sh(T("fit", TINY, *micro(w), "name=../escaped"))
    r["written"] = runs_of(w)
    return r


def case_name_absolute():
    w = fresh("name_abs")
    r = sh(T("fit", TINY, *micro(w), f"name={w}/abs"))
    r["written"] = runs_of(w)
    return r


def case_cache_truncated():
    w = fresh("cache_trunc")
    trained_run()
    shutil.copytree(CACHE, w / "cache")
    (f,) = [p for p in (w / "cache/tokens").glob("shakespeare-*.npz")][:1]
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    r = sh(T("fit", TINY, *micro(w, **{"data.cache_dir": w / "cache"})))
    r["cache_size_after"] = f.stat().st_size if f.exists() else None
    r["cache_size_full"] = len(data)
    return r


def _mount(where: Path, opts: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)


def case_cache_readonly():
    w = fresh("cache_ro")
    _mount(w / "ro", "ro,size=1m")
    try:
        r = sh(T("fit", TINY, *micro(w, **{"data.cache_dir": w / "ro/cache"})))
    finally:
        subprocess.run(["umount", str(w / "ro")])
    r["written"] = runs_of(w)
    return r


def case_out_readonly():
    w = fresh("out_ro")
    _mount(w / "ro", "ro,size=1m")
    try:
        r = sh(T("fit", TINY, *micro(w, **{"trainer.out_dir": w / "ro/runs"})))
    finally:
        subprocess.run(["umount", str(w / "ro")])
    return r


def case_out_is_file():
    w = fresh("out_file")
    (w / "afile").write_text("x")
    return sh(T("fit", TINY, *micro(w, **{"trainer.out_dir": w / "afile"})))


def case_disk_full():
    w = fresh("full")
    _mount(w / "full", "size=256k")
    try:
        r = sh(T("fit", TINY, *micro(w, **{"trainer.out_dir": w / "full/runs"})))
    finally:
        subprocess.run(["umount", str(w / "full")])
    return r


def _bad(name, *override, limit=False):
    w = fresh(name)
    args = T("fit", TINY, *micro(w), *override)
    r = sh(LIMIT + q(args), shell=True) if limit else sh(args)
    r["run_folder_left"] = runs_of(w) or sorted(str(p.relative_to(w)) for p in w.glob("runs/*/*"))
    return r


def case_lr_nan():
    return _bad("lr_nan", "optim.lr=nan")


def case_lr_dotnan():
    return _bad("lr_dotnan", "optim.lr=.nan")


def case_lr_negative():
    return _bad("lr_neg", "optim.lr=-1")


def case_betas():
    return _bad("betas", "optim.betas=[0.9,1.5]")


def case_seq_len_zero():
    return _bad("seq0", "data.seq_len=0")


def case_seq_len_negative():
    return _bad("seqneg", "data.seq_len=-5")


def case_val_batches_zero():
    return _bad("vb0", "data.val_batches=0")


def case_seed_float():
    return _bad("seed", "seed=1.5")


def case_accelerator():
    return _bad("acc", "trainer.accelerator=tpux")


def case_strategy():
    return _bad("strat", "trainer.strategy=nope")


def case_devices_zero():
    return _bad("dev0", "trainer.devices=0")


def case_tokenizer_not_json():
    w = WORK / "tok"
    w.mkdir(parents=True, exist_ok=True)
    (w / "tok.txt").write_text("this is not json\n")
    return _bad("tok2", f"data.tokenizer={w / 'tok.txt'}")


def case_huge_d_model():
    return _bad("huge_d", "model.d_model=1000000", "model.n_heads=4", limit=True)


def case_huge_seq_len():
    w = fresh("huge_T")
    args = T("fit", TINY, f"trainer.out_dir={w / 'runs'}", f"data.cache_dir={CACHE}", "model.max_seq_len=100000000")
    r = sh(LIMIT + q(args), shell=True)
    r["run_folder_left"] = runs_of(w)
    return r


def case_info_huge():
    r = sh(LIMIT + q(T("info", TINY, "model.d_model=1000000")), shell=True)
    r["warning_lines"] = [x for x in (r["stdout"] + r["stderr"]).splitlines() if "warning" in x.lower()][:3]
    return r


def case_non_utf8():
    w = fresh("nonutf8")
    (w / "bin.txt").write_bytes(b"hello world " * 100 + b"\xff\xfe\x00\x81 binary" + b" more text" * 100)
    return sh(T("fit", TINY, *micro(w), f"data.source={{type: text, paths: [{w / 'bin.txt'}]}}"))


def case_malformed_model_yaml():
    w = fresh("badyaml")
    run = trained_run()
    shutil.copytree(run / "model", w / "model")
    (w / "model/config.yaml").write_text("d_model: [32\n  n_layers: : 2\n")
    return sh(T("eval", w / "model"))


def case_model_dir_without_weights():
    w = fresh("noweights")
    run = trained_run()
    (w / "model").mkdir()
    shutil.copy(run / "model/config.yaml", w / "model/config.yaml")
    return sh(T("eval", w / "model"))


def case_resume_without_config():
    w = fresh("noconfig")
    import torch

    run = trained_run()
    c = torch.load(sorted(run.glob("checkpoints/*.ckpt"))[-1], weights_only=True)
    c.pop("hyper_parameters", None)
    torch.save(c, w / "step-000006.ckpt")
    return sh(T("fit", TINY, *micro(w), "--resume", w / "step-000006.ckpt"))


def _sample(*opts):
    return sh(T("sample", trained_run(), "--tokens", "5", *opts))


def case_sample_temperature_zero():
    return _sample("--temperature", "0")


def case_sample_temperature_nan():
    return _sample("--temperature", "nan")


def case_sample_top_k_zero():
    return _sample("--top-k", "0")


def case_sample_tokens_negative():
    return sh(T("sample", trained_run(), "--tokens", "-1"))


def case_bench_steps_zero():
    w = fresh("bench")
    return sh(T("bench", TINY, *micro(w), "--steps", "0"))


def case_shape_mismatch():
    return sh(T("eval", trained_run(), "model.d_model=64"))


def case_weights_only_refused():
    w = fresh("pickled")
    import torch

    torch.save({"state_dict": {}, "payload": argparse_namespace()}, w / "evil.ckpt")
    return sh(T("eval", w / "evil.ckpt"))


def argparse_namespace():
    import argparse

    return argparse.Namespace(a=1)


def case_dhsa_covers_context():
    return sh(T("eval", trained_run(), "model.mixer.type=dhsa", "model.mixer.budget=64", "data.batch_size=1024"))


def case_sample_prints_overrides():
    return sh(T("sample", trained_run(), "--tokens", "5", "model.mixer.type=dhsa"))


def case_fit_validation_lines():
    w = fresh("vallines")
    r = sh(T("fit", TINY, *micro(w)))
    r["validation_lines"] = [x for x in r["stdout"].splitlines() if x.lstrip().startswith(("step", "val"))][:4]
    return r


def case_help_time():
    return sh(T("--help"))


def case_oc_env_secret():
    w = fresh("secret")
    (w / "s.yaml").write_text(f"base: {TREE / TINY}\ntrainer:\n  sample_prompt: ${{oc.env:SECRET_TOKEN}}\n")
    r = sh(T("fit", w / "s.yaml", *micro(w)))
    r["secret_in_saved_config"] = any("hunter2" in p.read_text() for p in w.glob("runs/**/config.yaml"))
    return r


def case_oc_env_override():
    w = fresh("secret2")
    r = sh(T("fit", TINY, *micro(w), "trainer.sample_prompt=${oc.env:SECRET_TOKEN}"))
    r["secret_in_saved_config"] = any("hunter2" in p.read_text() for p in w.glob("runs/**/config.yaml"))
    return r


# ------------------------------------------------------------------------------------------------ table
TESTS = {  # case -> the test in tests/train/test_reliability.py that guards it
    "concurrent": "test_two_runs_started_in_the_same_second_get_two_folders, "
    "test_an_existing_file_never_stops_a_checkpoint_from_being_written",
    "nan_fit": "test_nan_stop_never_keeps_the_checkpoint_that_diverged, "
    "test_a_checkpoint_is_kept_only_once_a_loss_on_its_weights_is_finite",
    "nan_eval": "test_nan_stop_never_keeps_the_checkpoint_that_diverged",
    "nan_eval_diverged": "test_eval_of_diverged_weights_exits_non_zero",
    "sigterm": "test_sigterm_and_sigint_write_a_checkpoint_and_exit_143_and_130",
    "sigint": "test_sigterm_and_sigint_write_a_checkpoint_and_exit_143_and_130",
    "resume_older": "test_resume_from_an_older_checkpoint_sets_later_ones_aside_and_keeps_the_csv",
    "resume_loose": "test_resume_from_a_loose_checkpoint_starts_a_new_run_folder",
    "step_million": "test_checkpoints_sort_by_step_number_past_a_million",
    "name_escape": "test_name_must_be_a_plain_folder_name",
    "name_absolute": "test_name_must_be_a_plain_folder_name",
    "cache_truncated": "test_a_truncated_token_cache_is_rebuilt",
    "cache_readonly": "test_a_read_only_cache_folder_is_one_error_line",
    "out_readonly": "test_a_read_only_output_folder_is_one_error_line",
    "out_is_file": "test_an_output_folder_that_is_a_file_is_one_error_line",
    "disk_full": "test_a_full_disk_is_one_error_line_naming_the_checkpoint",
    **{
        c: "test_bad_inputs_fail_before_anything_is_built_or_written"
        for c in (
            "lr_nan",
            "lr_dotnan",
            "lr_negative",
            "betas",
            "seq_len_zero",
            "seq_len_negative",
            "val_batches_zero",
            "seed_float",
            "accelerator",
            "strategy",
            "devices_zero",
            "tokenizer_not_json",
            "huge_d_model",
            "huge_seq_len",
        )
    },
    "info_huge": "test_info_warns_about_a_model_too_large_for_memory",
    "non_utf8": "test_text_that_is_not_utf8_names_the_file_and_offset",
    "malformed_model_yaml": "test_broken_model_folders_are_clear_errors",
    "model_dir_without_weights": "test_broken_model_folders_are_clear_errors",
    "resume_without_config": "test_resume_of_a_checkpoint_without_a_saved_config_is_a_clear_error",
    **{
        c: "test_bad_command_arguments_are_one_error_line"
        for c in (
            "sample_temperature_zero",
            "sample_temperature_nan",
            "sample_top_k_zero",
            "sample_tokens_negative",
            "bench_steps_zero",
        )
    },
    "shape_mismatch": "test_weights_that_do_not_fit_name_the_first_keys_and_shapes",
    "weights_only_refused": "test_a_pickled_payload_is_refused_without_suggesting_weights_only_false",
    "dhsa_covers_context": "test_sample_says_what_it_overrode_and_when_a_sparse_mixer_is_dense, "
    "test_density_one_means_exactly_dense_attention",
    "sample_prints_overrides": "test_sample_says_what_it_overrode_and_when_a_sparse_mixer_is_dense",
    "fit_validation_lines": "test_fit_prints_a_line_per_validation",
    "help_time": "test_config_error_is_instant_without_lightning",
    "oc_env_secret": "test_environment_variables_are_refused_in_configs",
    "oc_env_override": "test_environment_variables_are_refused_in_configs",
}
FACTS = (  # what a case observed beyond its exit code and line
    "run_dirs",
    "checkpoints",
    "kept_max_abs_weight",
    "exported",
    "checkpoints_after",
    "csv_steps_after",
    "latest_checkpoint",
    "written_into_grandparent",
    "written",
    "run_folder_left",
    "cache_size_after",
    "cache_size_full",
    "validation_lines",
    "secret_in_saved_config",
    "target",
)


def telling_line(r: dict) -> str:
    """The line that tells what happened: the ``error:`` line, else a failure's last line (a traceback's
    exception), else the first line printed."""
    if "driver_error" in r:
        return f"(not run: {r['driver_error'][:120]})"
    if "last_lines" in r:
        return r["last_lines"][-1] if r["last_lines"] else ""
    if r.get("error_line"):
        return r["error_line"]
    rc = r.get("rc")
    if rc not in (0, None) and not isinstance(rc, list):
        return r.get("stderr_last", "")
    first = r.get("stdout1", "")
    return " / ".join(first) if isinstance(first, list) else first


def cell(r: dict | None) -> str:
    """rc, the telling line and the facts of one case, for one markdown cell."""
    if r is None:
        return "(not run)"
    facts = "; ".join(f"{k}={r[k]}" for k in FACTS if k in r)
    if r.get("rc") == 0 and r.get("warning_lines"):
        facts = "; ".join(x for x in (f"then `{r['warning_lines'][0][:200]}`", facts) if x)
    text = f"**{r.get('rc')}** `{telling_line(r)[:220]}`" + (f" — {facts}" if facts else "")
    if r.get("case") == "help_time":
        text += f" ({r.get('seconds')} s)"
    return text


COMMANDS = {  # the commands shown for records older than the "cmd" field (same functions) and for scripts
    "step_million": "python -c 'print(latest_checkpoint(<a folder holding step-999999.ckpt and step-1000000.ckpt>))'",
    "concurrent": "2x (at once) python -m train fit configs/lm/gpt-tiny.yaml MICRO",
    "nan_fit": "python -m train fit configs/lm/gpt-tiny.yaml MICRO optim.lr=1e+30 optim.warmup_steps=0 "
    "optim.grad_clip=0 trainer.ckpt_every=1",
    "nan_eval": "python -m train eval <the newest checkpoint nan_fit kept> data.batch_size=1024",
    "sigterm": "python -m train fit configs/lm/gpt-tiny.yaml MICRO trainer.max_steps=100000 trainer.val_every=1000 "
    "trainer.ckpt_every=1000  # then kill -SIGTERM",
    "sigint": "python -m train fit configs/lm/gpt-tiny.yaml MICRO trainer.max_steps=100000 trainer.val_every=1000 "
    "trainer.ckpt_every=1000  # then kill -SIGINT",
}


def shorten(text: str, folder: Path) -> str:
    """A table cell's text with the runs' work folders (``<folder>/*-work``) written W, the interpreter python,
    and the micro run's overrides (tests/conftest.py: micro_overrides) left at their defaults written MICRO."""
    text = re.sub(re.escape(str(folder)) + r"/[\w.-]+-work", "W", text).replace(sys.executable, "python")
    text = re.sub(r" trainer\.out_dir=W/[\w.-]+/runs(?=[ `]|$)", "", text)
    text = text.replace(f" data.cache_dir={folder / 'cache'}", "")
    defaults = [o for o in micro_overrides(Path("."), Path(".")) if "_dir=" not in o]
    if all(o in text for o in defaults[:3]):
        text = text.replace(" " + defaults[0], " MICRO", 1)
        for o in defaults[1:]:
            text = re.sub(" " + re.escape(o) + "(?=[ `]|$)", "", text)
    return text.replace("|", "\\|").replace("\n", " ")


def load(paths: str) -> dict[str, dict]:
    """Case -> its record in comma-separated JSON-lines files (a later record replaces an earlier one, unless
    the later one did not run)."""
    records = {}
    for path in paths.split(","):
        with open(path) as f:
            for r in map(json.loads, f):
                if "driver_error" not in r or r["case"] not in records:
                    records[r["case"]] = r
    return records


def table(before_path: str, after_path: str) -> str:
    """The markdown table of the closing note: per case its command, before and after, and its test."""
    before, after = load(before_path), load(after_path)
    lines = [
        "MICRO: the micro run of tests/conftest.py (d_model 32, 2 layers, T 32, batch 4, 6 steps, checkpoints and "
        "validation every 3); W: the work folder of the run; line: the `error:` line, else a failure's last line "
        "(a traceback's exception), else the first line printed; then the first warning and what the case found",
        "",
        "| case | command | before: exit, line | after: exit, line | test |",
        "|---|---|---|---|---|",
    ]
    for case in [c for c in TESTS if c in before or c in after]:
        b, a = before.get(case), after.get(case)
        cmd = COMMANDS.get(case) or next((r["cmd"] for r in (a, b) if r and "cmd" in r), "")
        row = [case, f"`{cmd}`", cell(b), cell(a), TESTS[case]]
        folders = {Path(p).resolve().parent for p in f"{before_path},{after_path}".split(",")}
        for folder in folders:
            row = [shorten(x, folder) for x in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run(tree: str, out: str, only: list[str]) -> None:
    global TREE, WORK, CACHE
    TREE, out_path = Path(tree).resolve(), Path(out).resolve()
    WORK, CACHE = out_path.parent / (out_path.stem + "-work"), out_path.parent / "cache"
    WORK.mkdir(parents=True, exist_ok=True)
    names = [n[5:] for n in globals() if n.startswith("case_") and (not only or n[5:] in only)]
    with open(out_path, "a") as f:
        for name in names:
            t0 = time.time()
            try:
                res = globals()["case_" + name]()
            except Exception as e:  # record and go on
                res = {"driver_error": repr(e)[:2000]}
            res = {"case": name, **res, "wall": round(time.time() - t0)}
            print(json.dumps({k: v for k, v in res.items() if k not in ("stdout", "stderr")}), flush=True)
            f.write(json.dumps(res) + "\n")
            f.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["table"] and len(sys.argv) == 4:
        print(table(sys.argv[2], sys.argv[3]))
    elif sys.argv[1:2] == ["run"] and len(sys.argv) >= 4:
        run(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
