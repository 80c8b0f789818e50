"""Blocks outside our CausalLM: LayerContext.for_block, mixers without projections (core_only), DHSA's decoding
state from a prefill, and every example of README's "Using a block in your model" section (each one run)."""

import importlib.util
import re

import pytest
import torch

from arch import ConfigError, LayerContext
from arch.attention import CausalSelfAttention, causal_attention
from arch.bra import CausalBRA
from arch.dhsa import DHSA
from tests.conftest import ROOT

SECTION = "## Using a block in your model"


def readme_examples() -> list[str]:
    """The python code blocks of README's section SECTION (up to the next level-2 heading)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = re.split(r"\n## ", text.split(SECTION, 1)[1], maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_section_has_an_example_per_block():
    code = "\n".join(readme_examples())
    for name in (
        "CausalSelfAttention(",
        "DHSA(",
        'chunker="fixed"',
        "CausalBRA(",
        "BiLevelRoutingAttention(",
        "Pattention(",
        "PattentionFFN(",
        "DuoFFN(",
        "swap_attention(",
        "swap_mlp(",
    ):
        assert name in code, f"README section {SECTION!r} has no example using {name}"


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index):
    code = readme_examples()[index]
    if "transformers" in code and importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -e '.[hf]')")
    torch.manual_seed(index)
    exec(compile(code, f"README.md:{SECTION}[{index}]", "exec"), {"__name__": f"readme_example_{index}"})


# ------------------------------------------------------------------------------------------------- for_block
def test_for_block_defaults_and_fields():
    ctx = LayerContext.for_block(d_model=96, n_heads=6)
    assert (ctx.n_kv_heads, ctx.head_dim, ctx.max_seq_len, ctx.n_layers, ctx.layer_idx) == (6, 16, 2048, 1, 0)
    assert ctx.proj == {"type": "linear", "bias": False} and ctx.norm == {"type": "rmsnorm", "eps": 1e-6}
    ctx = LayerContext.for_block(d_model=96, n_heads=6, n_kv_heads=2, n_layers=4, layer_idx=3, rope_fraction=0.25)
    assert (ctx.n_kv_heads, ctx.layer_idx, ctx.rope_fraction) == (2, 3, 0.25)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 30, "n_heads": 4}, "block.d_model: 30 is not divisible by block.n_heads=4"),
        ({"d_model": 32, "n_heads": 4, "n_kv_heads": 3}, "block.n_kv_heads: 3 must divide"),
        ({"d_model": 32, "n_heads": 4, "layer_idx": 2, "n_layers": 2}, "block.layer_idx: 2 is out of range"),
        ({"d_model": 32, "n_heads": 4, "proj": "nonsense"}, "block.proj.type: unknown projection 'nonsense'"),
    ],
)
def test_for_block_errors_name_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        LayerContext.for_block(**kwargs)


# ------------------------------------------------------------------------------------------------- core_only
@pytest.mark.parametrize(
    "cls, options",
    [
        (CausalSelfAttention, {}),
        (DHSA, {"budget": 24, "query_block": 8, "n_init": 4, "n_recent": 4}),
        (CausalBRA, {"region_size": 8, "topk": 1}),
    ],
)
def test_core_only_has_no_projections_and_attends_like_the_full_mixer(cls, options):
    ctx = LayerContext.for_block(d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=128)
    torch.manual_seed(0)
    full, core = cls(ctx, **options), cls.core_only(ctx, **options)
    assert not list(core.parameters()) and not hasattr(core, "rope")
    q, k, v = torch.randn(2, 77, 4, 16), torch.randn(2, 77, 2, 16), torch.randn(2, 77, 2, 16)
    torch.testing.assert_close(core.attend(q, k, v), full.attend(q, k, v), rtol=0, atol=0)
    if cls is not CausalSelfAttention:  # the sparse ones really are sparse here
        assert (core.attend(q, k, v) - causal_attention(q, k, v)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------------- DHSA decode_state
@pytest.mark.parametrize("chunker", ["similarity", "fixed"])
@pytest.mark.parametrize("prompt", [1, 6, 40, 48, 53])  # shorter than the lookahead, mid-block, block start
def test_dhsa_decode_state_continues_like_the_full_sequence(chunker, prompt):
    """decode_state(prefill) then attend_step for every later position equals the rows of attend() on the whole
    sequence (which the one-by-one decoding already equals), at a budget that is really sparse."""
    ctx = LayerContext.for_block(d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=128)
    m = DHSA.core_only(
        ctx,
        budget=20,
        chunker=chunker,
        query_block=8,
        n_init=4,
        n_recent=4,
        chunk_size=5,
        max_chunk=16,
        window=3,
        nms_radius=2,
    )
    g = torch.Generator().manual_seed(prompt)
    T = 83
    q, k, v = (torch.randn(1, T, h, 16, generator=g) for h in (4, 2, 2))
    full = m.attend(q, k, v)  # [1, T, 4, 16]
    assert (full - causal_attention(q, k, v)).abs().max() > 1e-2
    state = m.decode_state(q[:, :prompt], k[:, :prompt])
    rows = []
    for t in range(prompt, T):
        state["k"], state["v"] = k[:, : t + 1], v[:, : t + 1]
        rows.append(m.attend_step(q[:, t : t + 1], state))
    torch.testing.assert_close(torch.cat(rows, dim=1), full[:, prompt:], rtol=1e-5, atol=1e-5)


def test_dhsa_decode_state_needs_one_chunk_table_or_causal_mode():
    ctx = LayerContext.for_block(d_model=64, n_heads=4, max_seq_len=128)
    q, k = torch.randn(2, 60, 4, 16), torch.randn(2, 60, 4, 16)
    with pytest.raises(NotImplementedError, match="batch size 1"):
        DHSA.core_only(ctx, budget=20, query_block=8, n_init=4, n_recent=4).decode_state(q, k)
    DHSA.core_only(ctx, budget=20, chunker="fixed", query_block=8, n_init=4, n_recent=4).decode_state(q, k)
    with pytest.raises(NotImplementedError, match="mode 'causal'"):
        DHSA.core_only(ctx, budget=20, mode="prefill").decode_state(q, k)
