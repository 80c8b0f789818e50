"""CLI commands: info, eval, sample, bench (smoke: each prints what it promises)."""

import re

import pytest

from train.cli import main
from train.info import forward_flops_per_token

from ..conftest import CONFIGS, micro_overrides

TINY = str(CONFIGS / "lm/gpt-tiny.yaml")


def test_info_prints_table_params_and_flops(capsys):
    assert main(["info", TINY, "model.layers={'2-3': {ffn: {type: mlp, activation: gelu}}}"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 3,2" in out  # 3.2xM parameters
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+dense", line)]
    assert len(rows) == 4 and "gelu" in rows[3] and "swiglu" in rows[0]
    assert re.search(r"forward [\d.]+ MFLOP", out)


def test_flops_per_token_match_the_matmul_count():
    cfg = {
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "max_seq_len": 16,
        "vocab_size": 256,
        "ffn": {"type": "mlp", "activation": "gelu", "d_ff": 256},
    }
    d, f, T, V, L = 64, 256, 16, 256, 2
    per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * T * d  # projections + MLP + (QK^T, AV) at full TxT
    assert forward_flops_per_token(cfg) == L * per_layer + 2 * d * V


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    from train.fit import fit

    tmp = tmp_path_factory.mktemp("cli")
    return fit(TINY, micro_overrides(tmp, cache_dir))["run_dir"]


def test_eval_and_sample_from_checkpoint_and_export(trained, capsys):
    assert main(["eval", str(trained)]) == 0
    out = capsys.readouterr().out
    loss = float(re.search(r"val loss ([\d.]+) nats/token", out).group(1))
    assert 2.0 < loss < 5.6
    assert main(["eval", str(trained / "model")]) == 0
    assert f"val loss {loss:.4f}" in capsys.readouterr().out  # export and checkpoint agree
    assert main(["sample", str(trained), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert "ROMEO:" in first
    assert main(["sample", str(trained / "model"), "--prompt", "ROMEO:", "--tokens", "20", "--seed", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == first.splitlines()[1:]  # same weights, same seed


def test_eval_override_of_unknown_key_is_rejected(trained, capsys):
    assert main(["eval", str(trained), "model.mixer.budget=3"]) == 2
    assert "model.mixer.budget: unknown key" in capsys.readouterr().err


def test_bench_prints_both_loops_and_ratio(tmp_path, cache_dir, capsys):
    assert main(["bench", TINY, *micro_overrides(tmp_path, cache_dir), "--steps", "3", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| bare PyTorch \|\s+\d+", out) and re.search(r"\| Lightning\s+\|\s+\d+", out)
    assert float(re.search(r"Lightning / bare tokens/s = ([\d.]+)", out).group(1)) > 0
