"""Studies on pretrained Hugging Face models with our blocks swapped in (``arch.interop``), on SmolLM2: equality
checks, perplexity and selection recall of the sparse mixers (``hf_swap``), the passkey grid (``hf_passkey``),
prefill time and memory at 8k (``hf_prefill``), DuoFFN training and its routing oracle (``hf_duo``)."""

COMMANDS = {
    "hf-swap": "train.studies.hf.hf_swap",
    "hf-passkey": "train.studies.hf.hf_passkey",
    "hf-prefill": "train.studies.hf.hf_prefill",
    "hf-duo": "train.studies.hf.hf_duo",
}
BENCHMARKS = ()
