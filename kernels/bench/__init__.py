"""Benchmarks: the measurement harness (``harness``), the registry (``registry``) and the runner (``run``).

    python -m kernels.bench [NAME ...] [--impl ...] [--size T=8192] [--device cuda] [--list]

runs the kernel benchmarks registered by the modules of ``KERNEL_BENCHMARKS``; ``python -m train bench`` runs
these and the model-level benchmarks that ``train`` registers.
"""

KERNEL_BENCHMARKS = ("kernels.bench.block_sparse", "kernels.bench.pattention", "kernels.bench.routed_ffn")
