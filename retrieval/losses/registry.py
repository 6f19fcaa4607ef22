"""The loss registry: ``@LOSSES.register(name)`` on a loss class; building a loss from its config.

:func:`build_loss` is how a run gets its loss: the config's ``loss`` section (a name and that
loss's own settings) plus what the run knows (its seed, the number of classes, the embedding size).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from retrieval.errors import ConfigError
from retrieval.losses.settings import INJECTED, checked_settings, with_defaults
from retrieval.registry import Registry

if TYPE_CHECKING:
    from retrieval.config import LossConfig
    from retrieval.losses.base import CrossModalLoss

LOSSES: Registry = Registry("loss")


def check_loss_settings(name: str, values: Mapping[str, Any], *, where: str = "loss",
                        coerce: Callable[[Any, Any, str], Any] | None = None) -> dict[str, Any]:
    """The settings ``values`` of the loss registered as ``name``, checked (see ``settings.checked_settings``)."""
    try:
        loss_class = LOSSES.get(name)
    except ConfigError as error:
        raise ConfigError(f"{where}.name: {error}") from None
    return checked_settings(loss_class, name, values, where=where, coerce=coerce)


def create_loss(name: str, **kwargs: Any) -> CrossModalLoss:
    """Build a registered loss from its settings and any of :data:`INJECTED` it takes (others are ignored).

    An unknown name, an unknown or out-of-range setting, or a missing class count or embedding
    size gives a one-line ConfigError.
    """
    injected = {key: kwargs.pop(key) for key in INJECTED if key in kwargs}
    settings = check_loss_settings(name, kwargs, where=f"loss {name!r}")
    loss_class = LOSSES.get(name)
    parameters = inspect.signature(loss_class.__init__).parameters
    needed = [key for key in INJECTED if key in parameters and parameters[key].default is inspect.Parameter.empty]
    missing = [key for key in needed if injected.get(key) is None]
    if missing:
        raise ConfigError(f"loss {name!r} needs {' and '.join(missing)} to be built"
                          + (" (it trains on class labels)" if "num_classes" in missing else ""))
    given = {key: value for key, value in injected.items() if key in parameters and value is not None}
    return loss_class(**settings, **given)


def build_loss(config: LossConfig, *, seed: int = 0, num_classes: int | None = None,
               embedding_dim: int | None = None) -> CrossModalLoss:
    """The loss a config's ``loss`` section names, with its settings and what the run knows."""
    return create_loss(config.name, **config.settings, seed=seed, num_classes=num_classes,
                       embedding_dim=embedding_dim)


def loss_settings(config: LossConfig) -> dict[str, Any]:
    """Every setting of the configured loss: the configured values, defaults for the rest."""
    return with_defaults(LOSSES.get(config.name), config.settings)


def describe_loss(config: LossConfig) -> str:
    """``quadruplet (margin=0.3, second_margin=0.5, squared=False)``: the loss and every setting in effect."""
    settings = loss_settings(config)
    return config.name + (f" ({', '.join(f'{k}={v}' for k, v in settings.items())})" if settings else "")


