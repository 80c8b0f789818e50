"""Duo-LLM: router training hooks (``method``), route spaces and per-route losses (``routes``), baselines
(``summary``), the oracle command (``oracle``, ``report``), compute-follows-route benchmarks (``bench``)."""

COMMANDS = {"oracle": "train.studies.duo.oracle"}
BENCHMARKS = ("train.studies.duo.bench",)
