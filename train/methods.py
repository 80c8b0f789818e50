"""The method protocol: how a method's training-side pieces plug into the engine without the engine naming them.

The engine (config, LightningModule, fit, eval, info, CLI) knows no method. A method (a study folder under
``train/studies/``) registers one ``Method`` in ``METHODS``; the engine asks every registered method what it
adds to a given model, and iterates over whatever it gets:

* ``optim_fields``: a dataclass of extra ``optim.*`` keys (with defaults), checked like the engine's own;
* ``validate(cfg)``: extra checks of the whole resolved config, raising ``ConfigError``;
* ``attach(model, cfg) -> Hooks | None``: the per-run hooks for a model that has this method's blocks (``None``
  when it has none);
* ``describe(model) -> list[str]``: lines that ``info`` prints about the model (e.g. what a FLOP count means).

``Hooks`` is what a run calls: before every training micro-batch and validation pass, an auxiliary loss added
to the cross-entropy, metrics to log, Lightning callbacks, and ``on_load`` after trained weights are loaded
into the model. Every method is discovered by importing the packages under ``train/studies/`` (each registers
itself in its ``__init__``), so adding a method adds a folder and touches no engine file.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch
from torch import nn

from arch.registry import Field, Registry, fields_of_dataclass


class Hooks:
    """A method's per-run hooks; every method overrides only what it needs."""

    def before_batch(self, step: int, micro: int, rank: int) -> None:
        """Before the forward pass of training micro-batch ``micro`` of optimizer step ``step`` on ``rank``."""

    def before_validation(self, step: int, rank: int) -> None:
        """Before every validation pass (at optimizer step ``step``)."""

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Loss terms of the last forward pass to add to the cross-entropy, by name (each logged as
        ``train/<name>``)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Scalars to log at log steps (names include the method's own prefix)."""
        return {}

    def callbacks(self) -> list:
        """Extra Lightning callbacks for ``fit``."""
        return []


class Method:
    """A training-side plug-in of one method (see the module docstring)."""

    name: str = ""
    optim_fields: type | None = None  # a dataclass: extra optim.* keys

    def validate(self, cfg: dict) -> None:
        """Extra checks of the whole resolved config."""

    def attach(self, model: nn.Module, cfg: dict) -> Hooks | None:
        """Hooks for a run of ``model``; None when the model has none of this method's blocks."""
        return None

    def on_load(self, model: nn.Module, cfg: dict) -> None:
        """After trained weights were loaded into ``model`` (fit --init-from, eval, every loaded checkpoint)."""

    def describe(self, model: nn.Module) -> list[str]:
        """Lines ``info`` prints about this method's blocks in ``model``."""
        return []


METHODS = Registry("method")
_instances: dict[str, Method] = {}


def load_methods() -> dict[str, Method]:
    """{name: Method} of every study that has a ``method`` module (importing it registers the method)."""
    from .studies import discover

    if not _instances:
        for study in discover():
            if importlib.util.find_spec(f"{study.__name__}.method") is not None:
                importlib.import_module(f"{study.__name__}.method")
        _instances.update({name: METHODS.get(name, "method")() for name in METHODS.names()})
    return _instances


def optim_fields() -> list[Field]:
    """The ``optim.*`` config fields every method adds."""
    return [f for m in load_methods().values() if m.optim_fields for f in fields_of_dataclass(m.optim_fields)]


def attach_all(model: nn.Module, cfg: dict) -> dict[str, Hooks]:
    """{method name: hooks} for every method with blocks in ``model``."""
    hooks = {}
    for name, method in load_methods().items():
        h = method.attach(model, cfg)
        if h is not None:
            hooks[name] = h
    return hooks


def on_load(model: nn.Module, cfg: dict) -> None:
    for method in load_methods().values():
        method.on_load(model, cfg)
