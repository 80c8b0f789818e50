"""train/studies/hf/hf_swap: the command-module protocol, equal-budget variants, and the check and perplexity
functions on a tiny random Llama (the command itself runs them on SmolLM2)."""

import argparse
import math

import pytest
import torch

from arch import ConfigError

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
from train.studies.hf import hf_swap  # noqa: E402


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    hf_swap.add_arguments(parser)
    return parser.parse_args(list(argv))


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=200,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def test_module_protocol_and_help_line():
    assert hf_swap.__doc__.splitlines()[0].strip()
    args = parse()
    assert (args.context, args.budgets, args.variants, args.windows) == (
        2048,
        [256, 512, 1024],
        ["dhsa", "fixed", "bra"],
        4,
    )
    assert callable(hf_swap.run)


def test_variants_spend_equal_budgets():
    args = parse("--n-init", "32", "--n-recent", "32", "--region-size", "64")
    specs = hf_swap.variant_specs(512, args)
    assert specs["dhsa"] == {"type": "dhsa", "budget": 512, "n_init": 32, "n_recent": 32}
    assert specs["fixed"]["chunker"] == "fixed" and specs["fixed"]["budget"] == 512
    assert specs["bra"] == {"type": "bra", "region_size": 64, "topk": 7, "attend_first": True}  # region 0 + 7 = 512
    assert hf_swap.full_budget_specs(8192, args)["bra"]["topk"] == "all"
    with pytest.raises(ConfigError, match="below one BRA region"):
        hf_swap.variant_specs(32, args)


def test_windows_are_evenly_spaced_and_checked():
    ids = torch.arange(1000)
    wins = hf_swap.windows(ids, 100, 4)
    assert [int(w[0, 0]) for w in wins] == [0, 300, 600, 900] and all(w.shape == (1, 100) for w in wins)
    with pytest.raises(ConfigError, match="only 1000"):
        hf_swap.windows(ids, 2000, 2)


def test_check_and_perplexities_on_a_tiny_llama():
    model = tiny_llama()
    args = parse("--n-init", "16", "--n-recent", "16", "--region-size", "32", "--chunk-size", "8")
    ids = torch.randint(0, 200, (1, 100), generator=torch.Generator().manual_seed(1))
    rows = hf_swap.check(model, ids, 6, hf_swap.full_budget_specs(1024, args))
    assert [r["variant"] for r in rows] == ["dhsa", "fixed", "bra"]
    assert all(r["max_abs_logit_diff"] <= 1e-4 and r["same_tokens"] and r["restore_exact"] for r in rows)
    assert "| dhsa |" in hf_swap.format_check(rows, 100, 6)
    wins = hf_swap.windows(torch.randint(0, 200, (600,), generator=torch.Generator().manual_seed(2)), 256, 2)
    lines = []
    table = hf_swap.perplexities(model, wins, [64, 128], args, lines.append)
    assert len(table) == 1 + 3 * 2 and len(lines) == len(table)
    dense = table[0]
    assert dense["variant"] == "dense" and dense["ppl_vs_dense"] == 1.0
    assert math.isclose(dense["ppl"], math.exp(sum(dense["nll"]) / 2))
    assert all(r["ppl"] != dense["ppl"] for r in table[1:])  # budgets below the window: really sparse
    text = hf_swap.format_ppl(table, wins, [64, 128])
    assert "budget 64" in text and "windows where DHSA's NLL < fixed block-sparse's" in text


def test_selection_recall_and_chunk_lengths():
    model = tiny_llama()
    args = parse("--n-init", "16", "--n-recent", "16", "--chunk-size", "8", "--variants", "dhsa", "fixed")
    wins = [torch.randint(0, 200, (1, 256), generator=torch.Generator().manual_seed(3))]
    full, sparse = hf_swap.selections(model, wins, [1024, 64], args)[:2], hf_swap.selections(model, wins, [64], args)
    assert all(abs(r["recall"] - 1.0) < 1e-5 for r in full)  # every past key kept: all the probability
    assert all(0.0 < r["recall"] < 0.99 for r in sparse)
    assert [r["mean_chunk"] for r in full if r["variant"] == "fixed"] == [8.0]
    assert "| dhsa | 64 |" in hf_swap.format_selections(sparse, 1, 256)
    assert not hasattr(model.model.layers[0].self_attn, "mixer")  # restored
