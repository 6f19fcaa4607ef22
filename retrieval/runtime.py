"""Where and how torch runs: the device, the CPU thread count and the seeds of every random generator."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch

from retrieval.errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda", "mps")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch; make CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(name: str, setting: str = "train.device") -> str:
    """``auto`` → cuda when visible, else cpu; any other name must be a device this machine has.

    An unknown or absent device is a one-line ConfigError naming ``setting`` (the field or option it came from).
    """
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"{setting}: unknown device {name!r}; use auto, cpu or cuda")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{setting}: {name!r} asked for, but no CUDA GPU is visible here; use auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{setting}: {name!r} asked for, but only {count} CUDA GPU(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting}: {name!r} asked for, but MPS is not available here; use auto or cpu")
    return name


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with ``count`` torch CPU threads, restoring the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
