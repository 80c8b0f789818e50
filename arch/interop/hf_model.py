"""Our causal LMs as Hugging Face models: ``AutoConfig`` / ``AutoModelForCausalLM`` know them once this module is
imported (``import arch.interop`` does it when ``transformers`` is installed), so a model trained here round-trips
through ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` and ``generate()`` works::

    import arch.interop
    from arch.interop.hf_model import to_hf
    hf = to_hf(arch.load_pretrained("runs/gpt-tiny/<ts>/model"))     # or to_hf(any CausalLM)
    hf.save_pretrained("hf-gpt-tiny")
    model = AutoModelForCausalLM.from_pretrained("hf-gpt-tiny")     # identical logits
    model.generate(ids, max_new_tokens=32, do_sample=False)

The config (``model_type: adaptive_compute_lm``) carries our resolved ``model:`` mapping; the weights are our
``CausalLM``'s state dict under ``lm.``. ``forward(input_ids)`` is ``CausalLM.forward`` exactly. Generation keeps a
``StepCache``: the prompt's logits come from ``forward``; the first decoding step replays the prompt through
``CausalLM.step`` and every later token is one ``step`` (our mixers' own incremental decoding). Models whose
mixers cannot decode incrementally (causal BRA; DHSA with a learned or similarity chunker on a batch whose chunk
boundaries differ) re-run the whole sequence for every new token instead. Padded batches are rejected.
"""

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import build_model
from ..lm import CausalLM
from ..rope import RotaryEmbedding

MODEL_TYPE = "adaptive_compute_lm"


class AdaptiveLMConfig(PretrainedConfig):
    """``model``: our ``model:`` config mapping (``CausalLM.config``); the fields transformers reads are derived."""

    model_type = MODEL_TYPE
    model: dict | None = None
    vocab_size: int = 256
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.model is not None:
            self.vocab_size = self.model.get("vocab_size", 256)
            self.max_position_embeddings = self.model["max_seq_len"]
            self.tie_word_embeddings = self.model.get("tie_embeddings", True)
        super().__post_init__(**kwargs)


class StepCache:
    """Decoding state of one ``generate`` call: the tokens so far and our per-layer ``CausalLM.step`` caches
    (built on the first decoding step), or ``layers = None`` and re-running the sequence when the model's mixers
    cannot decode incrementally."""

    def __init__(self):
        self.ids: torch.Tensor | None = None  # [B, t]
        self.layers: list[dict] | None = None
        self.rerun = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.ids is None else self.ids.shape[1]

    def extend(self, lm: CausalLM, new_ids: torch.Tensor) -> torch.Tensor:
        """Append new_ids [B, n] -> their logits [B, n, vocab]."""
        if self.ids is None:  # the prompt: the exact forward
            self.ids = new_ids
            return lm(new_ids)
        if self.layers is None and not self.rerun:
            self.layers = self._replay(lm)
            self.rerun = self.layers is None
        self.ids = torch.cat([self.ids, new_ids], dim=1)
        if self.rerun:
            return lm(self.ids)[:, -new_ids.shape[1] :]
        return torch.cat([lm.step(new_ids[:, j : j + 1], self.layers) for j in range(new_ids.shape[1])], dim=1)

    def _replay(self, lm: CausalLM) -> list[dict] | None:
        """Our per-layer caches after stepping through the tokens so far, or None if a mixer cannot step."""
        layers = lm.new_cache()
        try:
            for j in range(self.ids.shape[1]):
                lm.step(self.ids[:, j : j + 1], layers)
        except NotImplementedError:
            return None
        return layers


class AdaptiveLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``CausalLM`` (``self.lm``) behind the Hugging Face causal-LM interface."""

    config_class = AdaptiveLMConfig
    base_model_prefix = "lm"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm.head.weight": "lm.tok_emb.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: AdaptiveLMConfig, lm: CausalLM | None = None):
        super().__init__(config)
        if config.model is None:
            raise ValueError("AdaptiveLMConfig.model is missing: the model: mapping of one of our configs is required")
        self.lm = lm if lm is not None else build_model(config.model)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # our own StepCache, returned by forward

    def _init_weights(self, module: nn.Module) -> None:
        """Our blocks initialise themselves when built; loading leaves only the RoPE tables (non-persistent
        buffers) to recompute."""
        if isinstance(module, RotaryEmbedding) and module.rot_dim:
            fresh = RotaryEmbedding(module.rot_dim, module.cos.shape[0], self.config.model["rope_theta"])
            module.cos.copy_(fresh.cos)
            module.sin.copy_(fresh.sin)

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.tok_emb

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: StepCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, T] -> logits [B, T, vocab] (``CausalLM.forward``); with ``use_cache`` a ``StepCache`` is
        returned (and continued when passed back); ``labels`` give the shifted cross-entropy ``loss``."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded batches are not supported (attention_mask must be all ones)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache:
            cache = cache if cache is not None else StepCache()
            logits = cache.extend(self.lm, input_ids)
        else:
            logits = self.lm(input_ids)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)


def to_hf(lm: CausalLM) -> AdaptiveLMForCausalLM:
    """Wrap one of our ``CausalLM``s (the same module and weights) as a Hugging Face model."""
    return AdaptiveLMForCausalLM(AdaptiveLMConfig(model=lm.config), lm=lm)


AutoConfig.register(MODEL_TYPE, AdaptiveLMConfig, exist_ok=True)
AutoModelForCausalLM.register(AdaptiveLMConfig, AdaptiveLMForCausalLM, exist_ok=True)
