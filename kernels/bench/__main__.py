"""``python -m kernels.bench``: run the kernel benchmarks (see ``kernels.bench``)."""

import argparse
import importlib

from . import KERNEL_BENCHMARKS, run

for module in KERNEL_BENCHMARKS:
    importlib.import_module(module)
parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=run.__doc__)
parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
run.add_arguments(parser)
args = parser.parse_args()
run.run(args.names, args)
