"""DHSA: learned chunk-boundary predictors (``boundaries``), long-context retrieval and perplexity of sparse
attention variants (``needle``), prefill-mode quality of fixed blocks, our DHSA, the authors' options and dense
(``quality``), and the prefill benchmark (``bench``)."""

COMMANDS = {
    "dhsa-boundaries": "train.studies.dhsa.boundaries",
    "needle": "train.studies.dhsa.needle",
    "dhsa-quality": "train.studies.dhsa.quality",
}
BENCHMARKS = ("train.studies.dhsa.bench",)
