"""Temporary minimal optimizer step (replaced by the recipe module)."""

from __future__ import annotations

import contextlib

import torch


class OptimizationStep:
    def __init__(self, train_config, encoder, loss_module, device: str, total_steps: int) -> None:
        parameters = [p for p in list(encoder.parameters()) + list(loss_module.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=train_config.lr, weight_decay=train_config.weight_decay)

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @property
    def will_step(self) -> bool:
        return True

    def step(self) -> bool:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def prepare_model(self, encoder):
        return encoder

    def prepare_inputs(self, inputs):
        return inputs
