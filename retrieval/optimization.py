"""The optimiser side of a training step: precision, learning rates and their schedule, clipping, accumulation.

:class:`Optimization` is built once per run from ``train.*`` and drives every micro-batch::

    optimization = Optimization(config.train, encoder, loss, device, total_steps)
    encoder = optimization.prepare_model(encoder)          # channels-last, before wrapping it in DDP
    for inputs, targets, labels in batches:
        with optimization.autocast():
            outputs = encoder(optimization.prepare_inputs(inputs))
        result = loss(outputs.float(), targets, labels)
        optimization.backward(result.value)             # under DDP's no_sync() unless optimization.will_step
        optimization.step()                             # True when an optimizer step was taken

With the default settings this is exactly the plain loop it replaces: one AdamW over the trainable
encoder and loss parameters at ``train.lr``, fp32, no schedule, no clipping, one micro-batch a step.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from retrieval.config import TrainConfig
from retrieval.errors import ConfigError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def device_type(device: str | torch.device) -> str:
    """``cuda:1`` → ``cuda``."""
    return torch.device(device).type


def check_precision(precision: str, device: str | torch.device) -> None:
    """Refuse, in one line, a ``train.precision`` the resolved device cannot run (fp16 needs CUDA).

    Call it where ``train.device`` is resolved (``auto`` is only known then); :class:`Optimization` calls it too.
    """
    kind = device_type(device)
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(f"train.precision: fp16 needs a CUDA device, and training runs on {kind}; "
                          "use bf16 (or fp32) there")
    if precision == "bf16" and not torch.amp.is_autocast_available(kind):
        raise ConfigError(f"train.precision: bf16 autocast is not available on {kind} with this torch; use fp32")
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: this CUDA GPU has no bfloat16 support; use fp16 (or fp32)")


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """The multiple of the configured lr used by optimizer step ``step`` (0-based).

    Warm-up: steps ``0 .. warmup_steps-1`` ramp linearly, ``(step+1) / (warmup_steps+1)``, so none runs at 0
    and the next step runs at the full lr. ``constant`` then stays at 1; ``cosine`` follows half a cosine
    from 1 after warm-up to 0 at ``total_steps`` (the lr once the run's last optimizer step is done).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_grad_scaler(device_kind: str, enabled: bool) -> torch.amp.GradScaler:
    """The fp16 loss scaler (a pass-through when disabled); the one place a CUDA-only object is made."""
    return torch.amp.GradScaler(device_kind, enabled=enabled)


def parameter_groups(encoder: nn.Module, loss_module: nn.Module, train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: the trainable backbone parameters at ``train.backbone_lr`` (or ``train.lr``),
    then the rest (projection, loss) at ``train.lr``; a single group, in the encoder's then the loss's parameter
    order, when no backbone parameter trains."""
    encoder = _unwrapped(encoder)
    trainable = [p for p in list(encoder.parameters()) + list(loss_module.parameters()) if p.requires_grad]
    backbone = getattr(encoder, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if backbone is not None else set()
    in_backbone = [p for p in trainable if id(p) in backbone_ids]
    if not in_backbone:
        return [{"params": trainable, "lr": train.lr}]
    rest = [p for p in trainable if id(p) not in backbone_ids]
    backbone_lr = train.backbone_lr if train.backbone_lr is not None else train.lr
    return [{"params": in_backbone, "lr": backbone_lr}, {"params": rest, "lr": train.lr}]


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


class Optimization:
    """How the gradients of a run become parameter updates.

    Holds AdamW (backbone and head parameter groups when the backbone trains), a warm-up + constant/cosine LR
    schedule (:func:`lr_factor`), the fp16 gradient scaler (enabled only for fp16 on CUDA), gradient
    accumulation over ``train.grad_accumulation`` micro-batches, clipping to ``train.grad_clip_norm``, the
    autocast context of ``train.precision`` and the channels-last memory format.

    ``total_steps`` is the number of optimizer steps in the run (micro-batches ÷ accumulation); the cosine
    schedule reaches 0 there.
    """

    def __init__(self, train: TrainConfig, encoder: nn.Module, loss_module: nn.Module, device: str | torch.device,
                 total_steps: int) -> None:
        check_precision(train.precision, device)
        if train.lr_schedule == "cosine" and total_steps < 1:
            raise ValueError(f"a cosine schedule needs the run's optimizer steps; got total_steps={total_steps}")
        self.train = train
        self.device_type = device_type(device)
        self.accumulation = train.grad_accumulation
        self.total_steps = total_steps
        self.micro_steps = 0  # micro-batches so far
        self.pending = 0  # micro-batches of the accumulation cycle under way
        self.completed_steps = 0  # optimizer steps (completed cycles) so far
        self.last_grad_norm: torch.Tensor | None = None  # total norm before clipping, at the last clipped step
        groups = parameter_groups(encoder, loss_module, train)
        self.backbone_trains = len(groups) == 2
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule())
        # a constant lr without warm-up never changes: its scheduler need not run each step (it costs ~10% of a
        # small step); it still counts steps, so its state matches a stepped one
        self.lr_changes = train.lr_schedule != "constant" or train.warmup_steps > 0
        self.scaler = make_grad_scaler(self.device_type, enabled=train.precision == "fp16")
        if train.channels_last == "auto":
            self.channels_last = self.device_type == "cuda" and self.backbone_trains
        else:
            self.channels_last = bool(train.channels_last)

    def _schedule(self) -> Callable[[int], float]:
        warmup, schedule, total = self.train.warmup_steps, self.train.lr_schedule, self.total_steps

        def factor(step: int) -> float:  # a plain function: LambdaLR keeps it out of its state_dict
            return lr_factor(step, warmup, schedule, total)

        return factor

    # -- the step ------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """The context to run the forward pass in: autocast to bf16/fp16, or nothing for fp32."""
        dtype = AUTOCAST_DTYPES.get(self.train.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate one micro-batch's loss, divided by the accumulation count (and scaled for fp16)."""
        if self.accumulation > 1:
            loss = loss / self.accumulation
        self.scaler.scale(loss).backward()

    @property
    def will_step(self) -> bool:
        """True when the next :meth:`step` completes an accumulation cycle (DDP must then synchronise)."""
        return self.pending + 1 >= self.accumulation

    def step(self, close_cycle: bool = False) -> bool:
        """Count a micro-batch; at the end of an accumulation cycle unscale, clip, step AdamW (unless the fp16
        scaler found inf/nan gradients and skips it), clear the gradients and advance the LR schedule.

        ``close_cycle`` ends the cycle early (the last batch of an epoch), so no gradient carries over
        into the next epoch and every epoch ends on a state that resumes exactly.

        Returns whether the cycle ended, i.e. whether this was an optimizer step of the schedule.
        """
        self.micro_steps += 1
        self.pending += 1
        if self.pending < self.accumulation and not close_cycle:
            return False
        return self._apply()

    def finish_cycle(self) -> bool:
        """Step with the gradients of a cycle left unfinished (a pass of unknown length ended inside one).

        Returns whether there was one. (Under DDP the loop closes the cycle on the epoch's known last batch
        instead, so that its gradients are synchronised.)"""
        return self._apply() if self.pending else False

    def _apply(self) -> bool:
        """The optimizer step at the end of a cycle."""
        self.pending = 0
        self.completed_steps += 1
        if self.train.grad_clip_norm is not None:
            self.scaler.unscale_(self.optimizer)
            self.last_grad_norm = nn.utils.clip_grad_norm_(self.parameters, self.train.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.lr_changes:
            self.scheduler.last_epoch += 1
            return True
        with warnings.catch_warnings():
            if self.scaler.is_enabled():  # a step the scaler skipped is still a step of the schedule
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        return True

    @property
    def optimizer_steps(self) -> int:
        """Completed accumulation cycles (optimizer steps of the schedule) so far."""
        return self.completed_steps

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses for the head (projection and loss) parameters."""
        return self.optimizer.param_groups[-1]["lr"]

    @property
    def backbone_lr(self) -> float | None:
        """The learning rate the next optimizer step uses for the backbone, or None when it does not train."""
        return self.optimizer.param_groups[0]["lr"] if self.backbone_trains else None

    # -- memory format -------------------------------------------------------------------------
    def prepare_model(self, encoder: nn.Module) -> nn.Module:
        """The encoder in channels-last memory format when that is on (its parameters stay the same objects);
        call it before wrapping the encoder in DDP."""
        return encoder.to(memory_format=torch.channels_last) if self.channels_last else encoder

    def prepare_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """Image batches (B, C, H, W) in channels-last when that is on; other tensors (cached features) as given."""
        if self.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, schedule, scaler and micro-batch count: tensors and plain values only (loads with
        ``weights_only=True``). Take it when :meth:`step` has just returned True: gradients accumulated
        within an unfinished cycle are not part of it."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "micro_steps": self.micro_steps,
                "completed_steps": self.completed_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a run with the same parameter groups."""
        saved = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        here = [len(group["params"]) for group in self.optimizer.param_groups]
        if saved != here:
            raise ConfigError(f"the saved optimizer state has parameter groups of {saved} tensors, this run "
                              f"{here}; resume with the model settings (model.freeze_backbone) it was saved with")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.micro_steps = int(state["micro_steps"])
        self.completed_steps = int(state["completed_steps"])
        self.pending = 0
