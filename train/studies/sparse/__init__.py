"""Sparse attention mixers side by side (causal BRA, DHSA, fixed block-sparse): the training-step benchmark
(``bench``)."""

COMMANDS = {}
BENCHMARKS = ("train.studies.sparse.bench",)
