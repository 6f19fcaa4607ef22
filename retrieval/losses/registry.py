"""The loss registry: ``@LOSSES.register(name)`` on a loss class, ``create_loss(name, **kwargs)``."""

from __future__ import annotations

from typing import Any

from retrieval.registry import Registry

LOSSES: Registry = Registry("loss")


def create_loss(name: str, **kwargs: Any):
    """Build a registered loss; an unknown name or argument gives a one-line ConfigError."""
    from retrieval.errors import ConfigError

    factory = LOSSES.get(name)
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise ConfigError(f"loss {name!r}: {error}") from None
