"""DHSA: learned chunk-boundary predictors (``boundaries``), long-context retrieval and perplexity of sparse
attention variants (``needle``), and the prefill benchmark (``bench``)."""

COMMANDS = {"dhsa-boundaries": "train.studies.dhsa.boundaries", "needle": "train.studies.dhsa.needle"}
BENCHMARKS = ("train.studies.dhsa.bench",)
