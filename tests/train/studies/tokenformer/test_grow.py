"""TokenFormer growth from the CLI: grow a trained checkpoint, continue with --init-from (frozen or not)."""

import re

import pytest
import torch

from arch.pattention import Pattention
from train.checkpoint import load_trained
from train.cli import main
from train.fit import fit

from ....conftest import CONFIGS, micro_overrides

TF = str(CONFIGS / "lm/tokenformer-tiny.yaml")
SMALL = {"model.proj.qkv_tokens": 8, "model.proj.proj_tokens": 8, "model.ffn.n_tokens": 16}


@pytest.fixture(scope="module")
def grown_dir(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("grow")
    run = fit(TF, micro_overrides(tmp, cache_dir, **SMALL))["run_dir"]
    assert main(["grow", str(run), "--scale", "2"]) == 0
    return run, run / "grown-x2"


def test_grow_cli_writes_an_exact_bigger_model(grown_dir, capsys):
    run, out = grown_dir
    _, small = load_trained(run)
    _, big = load_trained(out)
    x = torch.randint(0, 256, (2, 32))
    assert (big(x) - small(x)).abs().max() <= 1e-6
    assert big.blocks[0].ffn.n_tokens == 32 and big.blocks[0].mixer.q.n_tokens == 16
    assert main(["grow", str(run), "--slots", "qkv=12,ffn=20", "--out", str(run / "custom")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"max \|logit change\| on a random batch: [0-9.e+-]+", printed)
    _, custom = load_trained(run / "custom")
    assert custom.blocks[1].ffn.n_tokens == 20 and custom.blocks[1].mixer.o.n_tokens == 8


@pytest.mark.parametrize("freeze", [False, True])
def test_fit_init_from_grown_model(grown_dir, tmp_path, cache_dir, freeze):
    _, out = grown_dir
    _, start = load_trained(out)
    res = fit(
        TF,
        micro_overrides(tmp_path, cache_dir, **SMALL, **{"optim.freeze_old_tokens": freeze, "trainer.max_steps": 3}),
        init_from=str(out),
    )
    _, end = load_trained(res["run_dir"])
    assert end.blocks[0].ffn.n_tokens == 32  # the model section came from the grown model
    for m0, m1 in zip(start.modules(), end.modules()):
        if isinstance(m0, Pattention):
            n = int(m0.n_old)
            old_same = torch.equal(m0.key[:n], m1.key[:n]) and torch.equal(m0.value[:n], m1.value[:n])
            assert old_same == freeze
            assert not torch.equal(m0.key[n:], m1.key[n:])  # new tokens always train


def test_init_from_and_resume_exclude_each_other(grown_dir, capsys):
    run, out = grown_dir
    assert main(["fit", TF, "--init-from", str(out), "--resume", str(run)]) == 2
    assert "exclude each other" in capsys.readouterr().err
