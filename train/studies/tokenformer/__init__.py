"""TokenFormer: growth of a trained model (``grow``), frozen old tokens while training (``method``), and the
progressive-scaling experiment (``growth``)."""

COMMANDS = {"grow": "train.studies.tokenformer.grow", "growth-experiment": "train.studies.tokenformer.growth"}
BENCHMARKS = ()
