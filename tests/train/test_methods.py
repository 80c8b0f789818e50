"""The method protocol: the engine names no method, and a new method plugs in by adding a study package."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
import textwrap

import pytest

import train.studies
from train import methods
from train.cli import commands, main

from ..conftest import CONFIGS, ROOT, micro_overrides

ENGINE = sorted(p for p in (ROOT / "train").glob("*.py"))
METHOD_NAMES = re.compile(r"duo|tokenformer|pattention|dhsa|biformer|\bbra\b|router|\bgrow|oracle|needle", re.I)


def test_engine_files_name_no_method():
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in ENGINE
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if METHOD_NAMES.search(line)
    ]
    assert not hits, "engine files name a method:\n" + "\n".join(hits)


def test_every_study_command_is_in_the_cli_table():
    table = commands()
    for name in ("fit", "eval", "sample", "info", "bench", "oracle", "grow", "needle", "dhsa-boundaries"):
        assert name in table


def test_help_imports_no_lightning():
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "train", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "usage: python -m train" in out.stdout
    assert "lightning" not in out.stderr and "| torch" not in out.stderr


PLUGIN = '''
"""A test method: an optim key, an auxiliary loss, a metric and a callback, all through the protocol."""

COMMANDS = {{}}
BENCHMARKS = ()
'''

METHOD = """
import dataclasses

import lightning as L

from train.methods import METHODS, Hooks, Method

CALLS = []


@dataclasses.dataclass
class Options:
    probe_weight: float = 0.0


class Counter(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        CALLS.append(trainer.global_step)


class ProbeHooks(Hooks):
    def __init__(self, model, weight):
        self.model, self.weight = model, weight

    def aux_losses(self):
        return {{"probe_aux": self.weight * sum(p.square().sum() for p in self.model.parameters())}}

    def metrics(self):
        return {{"probe/value": 1.5}}

    def callbacks(self):
        return [Counter()]


@METHODS.register("probe")
class Probe(Method):
    optim_fields = Options

    def validate(self, cfg):
        if cfg["optim"]["probe_weight"] < 0:
            from arch.registry import ConfigError

            raise ConfigError("optim.probe_weight: must be >= 0")

    def attach(self, model, cfg):
        return ProbeHooks(model, cfg["optim"]["probe_weight"]) if cfg["optim"]["probe_weight"] else None
"""


@pytest.fixture
def probe_study(tmp_path, monkeypatch):
    """A study package `probe` placed beside the real ones (no engine file changes)."""
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN.format()))
    (pkg / "method.py").write_text(textwrap.dedent(METHOD.format()))
    monkeypatch.setattr(train.studies, "__path__", [*train.studies.__path__, str(tmp_path)])
    monkeypatch.setattr(methods, "_instances", {})
    yield
    for name in [m for m in sys.modules if m.startswith("train.studies.probe")]:
        del sys.modules[name]
    methods.METHODS._classes.pop("probe", None)


def test_a_new_method_plugs_in_through_the_protocol(probe_study, tmp_path, cache_dir):
    over = micro_overrides(tmp_path, cache_dir, **{"optim.probe_weight": 1e-3})
    assert main(["fit", str(CONFIGS / "lm/gpt-tiny.yaml"), *over]) == 0
    from train.studies.probe.method import CALLS

    assert CALLS == list(range(1, 7))  # its callback ran after each of the 6 steps
    (metrics,) = (tmp_path / "runs").glob("*/*/csv/metrics.csv")
    rows = list(csv.DictReader(open(metrics)))
    aux = [float(r["train/probe_aux"]) for r in rows if r.get("train/probe_aux")]
    assert len(aux) == 6 and all(a > 0 for a in aux)  # the auxiliary loss was added and logged every step
    assert any(r.get("probe/value") == "1.5" for r in rows)
    assert (
        main(["fit", str(CONFIGS / "lm/gpt-tiny.yaml"), *micro_overrides(tmp_path, cache_dir), "optim.probe_weight=-1"])
        == 2
    )
