"""Studies on pretrained Hugging Face models with our blocks swapped in (``arch.interop``): equality checks,
perplexity and selection recall of the sparse mixers on SmolLM2 (``hf_swap``)."""

COMMANDS = {
    "hf-swap": "train.studies.hf.hf_swap",
    "hf-passkey": "train.studies.hf.hf_passkey",
    "hf-prefill": "train.studies.hf.hf_prefill",
    "hf-duo": "train.studies.hf.hf_duo",
}
BENCHMARKS = ()
