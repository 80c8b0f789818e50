"""train: Lightning pretraining, data, CLI (``python -m train ...``), evaluation and benchmarks."""
