"""Figures of the studies: one place for matplotlib's headless backend, layout and atomic PNG writing."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from arch.io import atomic_write


@contextmanager
def figure(path: str | Path, figsize: tuple[float, float] = (6.4, 4.2), dpi: int = 120, **subplots):
    """``with figure(path) as (fig, ax): ...`` draws a figure and writes it to ``path`` (PNG, atomically) on
    exit; ``subplots`` go to ``plt.subplots`` (e.g. ``ncols=3, squeeze=False``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, layout="constrained", **subplots)
    try:
        yield fig, ax
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    finally:
        plt.close(fig)
