"""The LightningModule for causal LM pretraining, and the optimizer/schedule it shares with the bare loop."""

from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from arch import build_model

from .distributed import is_sharded
from .errors import NonFiniteLossError
from .methods import attach_all


def param_groups(model: nn.Module, weight_decay: float, ndim: dict[str, int] | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only; none on norms, biases (ndim < 2) or embeddings. ``ndim``: the
    parameters' dimensions by name when the model's own are not the original ones (FSDP: flat shards)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        dims = p.ndim if ndim is None else ndim[name]
        (no_decay if dims < 2 or id(p) in emb else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, optim: dict, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``min_lr`` at ``max_steps``."""
    lr, min_lr, warm = optim["lr"], optim["min_lr"], optim["warmup_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    progress = min((step - warm) / max(max_steps - warm, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: dict, ndim: dict[str, int] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    o = cfg["optim"]
    opt = torch.optim.AdamW(
        param_groups(model, o["weight_decay"], ndim),
        lr=o["lr"],
        betas=tuple(o["betas"]),
        eps=o["eps"],
        fused=False,
    )
    max_steps = cfg["trainer"]["max_steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, o, max_steps) / o["lr"])
    return opt, sched


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (nats per token) of a ``[B, T+1]`` batch."""
    logits = model(batch[:, :-1])  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


class LMModule(L.LightningModule):
    """Trains ``arch.build_model(cfg["model"])`` on next-token prediction.

    Logged: train/loss, train/bpb, train/tokens_per_s, train/grad_norm, lr, val/loss, val/bpb, and whatever the
    hooks of the model's methods add (``train.methods``): their auxiliary losses (``train/<name>``, added to
    the cross-entropy that train/loss reports) and metrics.
    A non-finite loss is recorded on device (no host sync per step) and raised as ``NonFiniteLossError`` at the
    next log step or checkpoint, naming the first bad step, before anything is saved.
    """

    def __init__(self, config: dict, bytes_per_token: float = 1.0):
        super().__init__()
        self.save_hyperparameters({"config": config, "bytes_per_token": bytes_per_token})
        self.cfg = config
        self.bytes_per_token = bytes_per_token
        self.model = build_model(config["model"])
        self.hooks = list(attach_all(self.model, config).values())  # the model's methods' training hooks
        self.param_ndim = {name: p.ndim for name, p in self.model.named_parameters()}  # before any sharding
        self.register_buffer("first_bad_step", torch.tensor(-1), persistent=False)
        self._fwd = None
        self._t_last, self._items = None, 0

    def configure_model(self) -> None:
        if self.cfg["trainer"]["compile"] and self._fwd is None:
            # kept out of the module tree: the checkpoint holds `model.*` once, not a `_orig_mod` copy
            object.__setattr__(self, "_fwd", torch.compile(self.model))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (self.model if self._fwd is None else self._fwd)(inputs)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        micro = batch_idx % self.cfg["trainer"]["accumulate_grad_batches"]
        for h in self.hooks:
            h.before_batch(self.global_step, micro, self.rank)
        loss = self.loss(batch)
        aux = {name: t for h in self.hooks for name, t in h.aux_losses().items()}
        if self.track(loss, batch[:, 1:].numel(), "train/tokens_per_s"):
            self.log("train/bpb", loss.detach() / math.log(2) / self.bytes_per_token)
            for h in self.hooks:
                self.log_dict(h.metrics())
        for name, term in aux.items():
            self.log(f"train/{name}", term.detach())
            loss = loss + term
        return loss

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self._trainer is not None else 0

    def track(self, loss: torch.Tensor, n_items: int, rate_name: str) -> bool:
        """Per-step bookkeeping shared by every task: the on-device non-finite flag, train/loss, and, on log steps
        (the return value), the NaN check and the throughput ``rate_name`` (items per second, all processes)."""
        self.record_finite(loss)
        self._items += n_items
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # several processes: the global batch's
        if (self.global_step + 1) % self.cfg["trainer"]["log_every"]:
            return False
        self.check_finite()
        now = time.perf_counter()
        if self._t_last is not None:
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log(rate_name, self._items * world / (now - self._t_last), prog_bar=True)
        self._t_last, self._items = now, 0
        return True

    def loss(self, batch) -> torch.Tensor:
        """The training loss of a batch (without methods' auxiliary losses). Sharded (FSDP): through the strategy's
        wrapper, which gathers the parameters (a collective: every process calls it)."""
        sharded = self._trainer is not None and is_sharded(self._trainer)
        return lm_loss(self.trainer.strategy.model if sharded else self, batch)

    def record_finite(self, loss: torch.Tensor) -> None:
        """Note (on device, no host sync) the step of the first non-finite loss."""
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step.copy_(torch.where(bad & (self.first_bad_step < 0), self.global_step, self.first_bad_step))

    def check_finite(self, dropped: int | None = None) -> None:
        """Raise ``NonFiniteLossError`` if a loss so far was not finite; ``dropped``: the step of a checkpoint
        deleted because that loss was computed with its weights."""
        step = int(self.first_bad_step)
        if step >= 0:
            deleted = f" The checkpoint of step {dropped}, whose weights gave it, was deleted." if dropped else ""
            raise NonFiniteLossError(
                f"training loss became NaN/inf at step {step}; stopped.{deleted} Checkpoints written before it are "
                "intact (lower optim.lr, raise optim.warmup_steps, or use trainer.precision=32)"
            )

    def on_validation_epoch_start(self) -> None:
        for h in self.hooks:
            h.before_validation(self.global_step, self.rank)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self.loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch.shape[0])
        self.log("val/bpb", loss / math.log(2) / self.bytes_per_token, sync_dist=True, batch_size=batch.shape[0])

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip = self.cfg["optim"]["grad_clip"]
        clip = clip if clip > 0 else float("inf")
        wrapper = self.trainer.strategy.model if self._trainer is not None else None
        if hasattr(wrapper, "clip_grad_norm_"):  # sharded (FSDP): the norm over every process's shard
            norm = wrapper.clip_grad_norm_(clip)
        else:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if (self.global_step + 1) % self.cfg["trainer"]["log_every"] == 0:
            self.log("train/grad_norm", norm)

    def configure_optimizers(self):
        opt, sched = build_optimizer(self.model, self.cfg, self.param_ndim)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        self._t_last, self._items = time.perf_counter(), 0


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of rows whose label is among the ``k`` highest logits (k capped at the number of classes)."""
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # [B, k]
    return (top == labels[:, None]).any(-1).float().mean()


class ClassifierModule(LMModule):
    """Trains an image classifier (``arch.build_model(cfg["model"])``, images -> logits) with cross-entropy.

    Logged: train/loss, train/acc1, train/images_per_s, train/grad_norm, lr, val/loss, val/acc1, val/acc5.
    Optimizer, schedule, clipping and the NaN stop are the LM module's."""

    def loss(self, batch) -> torch.Tensor:
        return self._logits_and_loss(batch)[1]

    def _logits_and_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch  # [B, C, H, W], [B]
        logits = self(images)
        return logits, F.cross_entropy(logits.float(), labels)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        logits, loss = self._logits_and_loss(batch)
        labels = batch[1]
        if self.track(loss, labels.numel(), "train/images_per_s"):
            self.log("train/acc1", topk_accuracy(logits.detach(), labels, 1))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        n = labels.shape[0]
        self.log("val/loss", F.cross_entropy(logits.float(), labels), prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/acc1", topk_accuracy(logits, labels, 1), prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/acc5", topk_accuracy(logits, labels, 5), sync_dist=True, batch_size=n)
