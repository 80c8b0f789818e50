"""Bi-level routing attention: the 2-D and 1-D benchmarks (``bench``)."""

COMMANDS = {}
BENCHMARKS = ("train.studies.bra.bench",)
