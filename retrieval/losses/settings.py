"""A loss's settings: the keyword arguments of its ``__init__``, checked against their annotations.

Every parameter of a registered loss's ``__init__`` is a setting a config may give
(``loss: {name: quadruplet, margin: 0.3}``), except :data:`INJECTED`: the values the builder
passes (the run's seed, the number of classes, the embedding size). A setting's annotation is its
type; ``Annotated[float, AtLeast(0.0)]`` (spelled :data:`NonNegativeFloat` etc.) adds its value
range and ``Annotated[str, CheckedBy(NEGATIVE_SAMPLERS.get)]`` a check of its own. An optional
setting may carry its checks inside the ``| None`` (``PositiveInt | None``: checked when not None)
or outside it (``Annotated[float | None, CheckedBy(f)]``: ``f`` also sees None). Rules that join
settings live in the loss's ``check_settings``. So a loss declares its settings once, in its
signature, and a config that names another setting is refused in one line.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from retrieval.errors import ConfigError

#: parameters the builder fills in; never settings a config gives
INJECTED = ("seed", "num_classes", "embedding_dim")


@dataclass(frozen=True)
class AtLeast:
    """A setting's lower bound (``strict``: the bound itself is not allowed)."""

    bound: float
    strict: bool = False

    def check(self, value: Any, where: str) -> None:
        if value is not None and (value <= self.bound if self.strict else value < self.bound):
            raise ConfigError(f"{where}: must be {'>' if self.strict else '>='} {self.bound}, got {value!r}")


@dataclass(frozen=True)
class CheckedBy:
    """A setting checked by ``function(value)``, which raises a ConfigError for a bad value (e.g. a registry lookup)."""

    function: Callable[[Any], Any]

    def check(self, value: Any, where: str) -> None:
        try:
            self.function(value)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None


NonNegativeFloat = Annotated[float, AtLeast(0.0)]
PositiveFloat = Annotated[float, AtLeast(0.0, strict=True)]
PositiveInt = Annotated[int, AtLeast(1)]


@dataclass(frozen=True)
class UnlessNone:
    """A check that applies when the value is not None (the check of ``X`` in a setting typed ``X | None``)."""

    inner: AtLeast | CheckedBy

    def check(self, value: Any, where: str) -> None:
        if value is not None:
            self.inner.check(value, where)


Check = AtLeast | CheckedBy | UnlessNone


def _checks_of(annotation: Any) -> tuple[Any, tuple[Check, ...]]:
    """An annotation without its ``Annotated`` extras, and the checks among them (also inside ``X | None``)."""
    if typing.get_origin(annotation) is Annotated:
        annotation, *extras = typing.get_args(annotation)
        annotation, inner = _checks_of(annotation)
        return annotation, tuple(extra for extra in extras if isinstance(extra, (AtLeast, CheckedBy))) + inner
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [_checks_of(member) for member in typing.get_args(annotation)]
        checked = [checks for member, checks in members if checks]
        if not checked:
            return annotation, ()
        if len(members) != 2 or type(None) not in [member for member, _ in members]:
            raise TypeError(f"checks inside {annotation} apply to one type: write them on X or X | None")
        (first, _), (second, _) = members
        return first | second, tuple(map(UnlessNone, checked[0]))
    return annotation, ()


@dataclass(frozen=True)
class Setting:
    """One setting of a loss: its type, default (``inspect.Parameter.empty`` when required) and checks."""

    name: str
    annotation: Any
    default: Any
    checks: tuple[Check, ...] = ()


def settings_of(loss_class: type) -> dict[str, Setting]:
    """The settings of a loss class, in signature order."""
    hints = typing.get_type_hints(loss_class.__init__, include_extras=True)
    found = {}
    for name, parameter in list(inspect.signature(loss_class.__init__).parameters.items())[1:]:
        if name in INJECTED or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation, checks = _checks_of(hints.get(name, Any))
        found[name] = Setting(name, annotation, parameter.default, checks)
    return found


def checked_settings(loss_class: type, name: str, values: Mapping[str, Any], *, where: str = "loss",
                     coerce: Callable[[Any, Any, str], Any] | None = None) -> dict[str, Any]:
    """``values`` as settings of ``loss_class`` (registered as ``name``): known, typed, in range.

    ``coerce(value, annotation, where)`` converts a value read from YAML to its annotated type (the
    config's own coercion; Python callers pass values of the right type). Returns the given settings
    only (defaults are not filled in, so that a saved config says exactly what was written).
    Anything else is a one-line ConfigError that names the loss and lists its settings.
    """
    settings = settings_of(loss_class)
    unknown = sorted(set(values) - set(settings))
    if unknown:
        raise ConfigError(
            f"{where}: loss {name!r} has no setting {', '.join(map(repr, unknown))}; its settings: "
            f"{', '.join(settings) or 'none'} (--set 'loss={{name: {name}, ...}}' replaces the whole loss section)")
    checked = {}
    for key, value in values.items():
        setting = settings[key]
        if coerce is not None:
            value = coerce(value, setting.annotation, f"{where}.{key}")
        for check in setting.checks:
            check.check(value, f"{where}.{key}")
        checked[key] = value
    missing = [key for key, setting in settings.items() if setting.default is inspect.Parameter.empty
               and key not in checked]
    if missing:
        raise ConfigError(f"{where}: loss {name!r} needs the setting(s) {', '.join(missing)}")
    try:
        loss_class.check_settings(with_defaults(loss_class, checked))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    return checked


def with_defaults(loss_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every setting of ``loss_class``: ``values`` where given, else the default."""
    return {key: values.get(key, setting.default) for key, setting in settings_of(loss_class).items()}
