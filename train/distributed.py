"""Several processes: the Lightning strategy ``trainer.strategy`` names, and what sharded training (FSDP) changes.

``trainer.strategy`` is any Lightning strategy name (``ddp``: gloo on CPU, NCCL on GPU); ``fsdp`` is Lightning's
``FSDPStrategy`` with the original parameters kept (``use_orig_params``: the optimizer's weight-decay groups and
tied embeddings work unchanged) and full checkpoints (one file, consolidated on rank 0, that a DDP or a
one-process run resumes as well). Lightning 2.6 accepts ``strategy="fsdp"`` only with a CUDA accelerator, and
PyTorch's FSDP needs ``device_id=cpu`` on CPU processes, whose full state dict must not be "offloaded to CPU"
(PyTorch then frees memory it still reads: a segfault). ``FSDP`` below changes exactly these three things when
its processes run on CPU (gloo), so the same strategy is tested on a CPU machine; on GPUs it is Lightning's.
"""

from __future__ import annotations

import contextlib

import torch
from lightning.pytorch.strategies import FSDPStrategy


@contextlib.contextmanager
def _no_cpu_offload():
    """Within this block, Lightning's full state dicts are gathered without offloading (on CPU processes)."""
    from lightning.pytorch.strategies import fsdp

    original = fsdp._get_full_state_dict_context
    # its offload_to_cpu is world_size > 1 in older Lightning and always True in 2.6: call it as one process and
    # turn the offload off
    fsdp._get_full_state_dict_context = lambda module, world_size, rank0_only=True: _full_no_offload(module, rank0_only)
    try:
        yield
    finally:
        fsdp._get_full_state_dict_context = original


def _full_no_offload(module, rank0_only: bool):
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as TorchFSDP

    return TorchFSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class FSDP(FSDPStrategy):
    """Lightning's ``FSDPStrategy``, also on CPU processes (see the module docstring)."""

    def _on_cpu(self) -> bool:
        return self.root_device.type == "cpu"

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as TorchFSDP

        if not self._on_cpu() or any(isinstance(m, TorchFSDP) for m in model.modules()):  # GPU, or wrapped already
            return super()._setup_model(model)
        return TorchFSDP(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )

    def lightning_module_state_dict(self):
        with _no_cpu_offload() if self._on_cpu() else contextlib.nullcontext():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer):
        with _no_cpu_offload() if self._on_cpu() else contextlib.nullcontext():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        with _no_cpu_offload() if self._on_cpu() else contextlib.nullcontext():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def build_strategy(name: str):
    """The ``strategy`` argument of Lightning's ``Trainer`` for ``trainer.strategy``."""
    if name == "fsdp":
        return FSDP(use_orig_params=True, state_dict_type="full")
    return name


def is_sharded(trainer) -> bool:
    """Whether the run's parameters are sharded across processes (no process holds the whole model)."""
    return isinstance(trainer.strategy, FSDPStrategy)


def whole_model(trainer, module) -> torch.nn.Module:
    """The trained model with all its weights: ``module.model`` itself, or under FSDP a copy built from the full
    state dict (a collective: every process must call this; the copy is complete on rank 0)."""
    if not is_sharded(trainer):
        return module.model
    from arch import build_model

    state = trainer.strategy.lightning_module_state_dict()  # {"model.<name>": tensor}, full on rank 0
    model = build_model(module.cfg["model"])
    if trainer.is_global_zero:
        model.load_state_dict({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")})
    return model.eval()


def final_validation(trainer, module, data) -> tuple[dict, torch.nn.Module]:
    """(validation metrics, the whole trained model) at the end of ``fit``: Lightning's ``validate``, or under FSDP
    (whose wrapped module Lightning 2.6 cannot validate again after ``fit``: it re-wraps sharded parameters) the
    repo's evaluation loop on the same held-out windows, on rank 0 with the gathered model (NaN elsewhere)."""
    if not is_sharded(trainer):
        return trainer.validate(module, data, verbose=False, weights_only=True)[0], module.model
    from .evaluate import mean_loss

    model = whole_model(trainer, module)
    loss = mean_loss(model, data.val_dataloader())["loss"] if trainer.is_global_zero else float("nan")
    return {"val/loss": loss}, model
