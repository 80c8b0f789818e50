"""Duo-LLM: router training hooks (``method``), routing oracles (``oracle``), compute-follows-route benchmarks."""

COMMANDS = {"oracle": "train.studies.duo.oracle"}
BENCHMARKS = ("train.studies.duo.bench",)
