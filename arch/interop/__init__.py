"""Interop with Hugging Face ``transformers`` (extra ``hf``): swap our mixers and FFNs into pretrained causal LMs
(``swap_attention``, ``swap_mlp``, ``restore``; no ``transformers`` import needed), and our own LMs as
``AutoModelForCausalLM`` models (``arch.interop.hf_model``, registered on import when ``transformers`` is
installed). See docs/interop.md."""

from __future__ import annotations

import importlib.util

from .swap import SwappedAttention, restore, swap_attention, swap_mlp

if importlib.util.find_spec("transformers") is not None:
    from . import hf_model  # noqa: F401  (registers our LM with AutoConfig / AutoModelForCausalLM)

__all__ = ["SwappedAttention", "restore", "swap_attention", "swap_mlp"]
