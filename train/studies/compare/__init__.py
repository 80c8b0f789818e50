"""Compare mechanisms at equal measured compute: sweeps of arms (configs and override sets) trained on the same
batches to one budget (training FLOPs measured on the live routes, tokens, or wall clock), with a results table,
JSON, a loss-vs-FLOPs plot and resumable state (``python -m train compare``)."""

COMMANDS = {"compare": "train.studies.compare.command"}
BENCHMARKS = ()
