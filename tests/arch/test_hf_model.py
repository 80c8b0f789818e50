"""Our LMs as Hugging Face models (arch.interop.hf_model): save_pretrained / AutoModelForCausalLM.from_pretrained
round trip with identical logits, generate() equal to greedy decoding by full forward passes, loss, errors."""

import pytest
import torch
import torch.nn.functional as F

import arch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
from arch.interop.hf_model import AdaptiveLMConfig, AdaptiveLMForCausalLM, StepCache, to_hf  # noqa: E402

BASE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 96, "init_std": 0.3}
MODELS = {  # init 0.3: logits vary enough that greedy decoding does not repeat one token
    "dense": {},
    "dhsa": {"mixer": {"type": "dhsa", "budget": 16, "query_block": 8, "n_init": 4, "n_recent": 4}},
    "bra": {"mixer": {"type": "bra", "region_size": 8, "topk": 1}},
    "dhsa-prefill": {  # prefill selections see later positions: no incremental decoding, the cache re-runs
        "mixer": {"type": "dhsa", "mode": "prefill", "budget": 16, "query_block": 8, "n_init": 4, "n_recent": 4}
    },
    "mixed": {  # per-layer blocks, Pattention projections and FFN, Duo FFN, untied head, partial RoPE
        "proj": {"type": "pattention", "qkv_tokens": 24, "proj_tokens": 24},
        "ffn": {"type": "duo", "routing": "fixed", "fixed_routes": ["big", "small"], "small_ratio": 4},
        "layers": {
            "1": {
                "mixer": {
                    "type": "dhsa",
                    "budget": 16,
                    "chunker": "fixed",
                    "query_block": 8,
                    "n_init": 4,
                    "n_recent": 4,
                },
                "ffn": {"type": "pattention", "n_tokens": 48},
            }
        },
        "tie_embeddings": False,
        "rope_fraction": 0.5,
    },
}


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return arch.build_model({**BASE, **MODELS[name]}).eval()


@torch.no_grad()
def greedy_by_forward(lm, x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = torch.cat([x, lm(x)[:, -1:].argmax(-1)], dim=1)
    return x


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_through_auto_classes_gives_identical_logits_and_generates(name, tmp_path):
    lm = build(name)
    to_hf(lm).save_pretrained(tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).model_type == "adaptive_compute_lm"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(model, AdaptiveLMForCausalLM)
    x = torch.randint(0, 256, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, lm(x))
        assert torch.equal(model(x, use_cache=False).logits, lm(x))
    prompt = x[:1, :20]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=24, do_sample=False, return_dict_in_generate=True)
    expected = greedy_by_forward(lm, prompt, 24)
    assert torch.equal(out.sequences, expected)
    assert len(set(expected[0, 20:].tolist())) > 2  # a generation that can tell a wrong cache apart
    cache = out.cache
    assert isinstance(cache, StepCache) and cache.get_seq_length() == 43
    assert cache.rerun == (name == "dhsa-prefill")  # incremental decoding through CausalLM.step where mixers have it


def test_tied_head_stays_tied_and_weights_are_stored_once(tmp_path):
    from safetensors import safe_open

    to_hf(build("dense")).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm.tok_emb.weight" in f.keys() and "lm.head.weight" not in f.keys()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.lm.head.weight is model.lm.tok_emb.weight


def test_loss_and_errors():
    model = to_hf(build("dense"))
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(2))
    out = model(x, labels=x, use_cache=False)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padded batches are not supported"):
        model(x, attention_mask=mask)
    with pytest.raises(ValueError, match="AdaptiveLMConfig.model is missing"):
        AdaptiveLMForCausalLM(AdaptiveLMConfig())
    with pytest.raises(arch.ConfigError, match="model.mixer.type: unknown mixer"):
        AdaptiveLMForCausalLM(AdaptiveLMConfig(model={**BASE, "mixer": "sparse"}))
