"""Method studies: one package per method, each with its commands, benchmarks and training plug-in.

A study package declares ``COMMANDS`` ({CLI command name: module with ``add_arguments`` and ``run``}) and
``BENCHMARKS`` (modules that register benchmarks into ``kernels.bench.registry``) in its ``__init__``, without
importing anything heavy, and may hold a ``method`` module that registers a ``train.methods.Method``. The engine
discovers them all (``discover``): a new method is a new folder here.
"""

import importlib
import pkgutil
from types import ModuleType


def discover() -> list[ModuleType]:
    """Every study package, imported (cheap: a study's ``__init__`` imports nothing heavy)."""
    return [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__) if m.ispkg]
