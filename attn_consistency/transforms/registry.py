"""The registry of transforms by name: :func:`register_transform`, :func:`get_transform`, :func:`available_transforms`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .._validation import (
    check_bool,
)
from .affine import Rotate, Translate
from .base import (
    Transform,
)
from .flip import Flip
from .scale import Scale

_REGISTRY: dict[str, Callable[..., Transform]] = {}


# Names end up as keys of the loss weights and of the terms, where '@' adds a view's size
# ("flip@224"), and on command lines: identifier-like names keep all of those unambiguous.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def register_transform(
    name: str, factory: Callable[..., Transform] | None = None, *, overwrite: bool = False
) -> Callable[..., Any]:
    """Make a transform available by name to :func:`get_transform` and the loss.

    Use it as a call, ``register_transform("vflip", VerticalFlip)``, or as a class
    decorator, ``@register_transform("vflip")``. A transform built from the name carries
    it (``get_transform("vflip").name == "vflip"``), so the loss weights keyed by it apply.

    Args:
        name: the name to look it up by: a letter or ``_``, then letters, digits, ``_``
            or ``-``.
        factory: a :class:`Transform` subclass or a function returning an instance.
        overwrite: replace an existing entry of that name instead of raising.

    Raises:
        TypeError: ``name`` is not a str, ``factory`` is not callable (or is a class that
            is not a :class:`Transform`), ``overwrite`` is not a bool.
        ValueError: ``name`` is not identifier-like, or is taken and ``overwrite`` is False.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"name must be a letter or '_' followed by letters, digits, '_' or '-', got {name!r}")
    check_bool("overwrite", overwrite)

    def add(factory: Callable[..., Transform]) -> Callable[..., Transform]:
        if isinstance(factory, type) and not issubclass(factory, Transform):
            raise TypeError(f"factory must be a Transform subclass or a callable, got the class {factory.__name__}")
        if not callable(factory):
            raise TypeError(f"factory must be a Transform subclass or a callable, got {type(factory).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a transform named {name!r} is already registered; pass overwrite=True to replace it")
        if isinstance(factory, type) and issubclass(factory, Transform) and "name" not in vars(factory):
            # a subclass that inherits its name (a Flip subclass would be "flip") takes the registered
            # one, so that its instances, made by name or directly, answer to their weight's key
            factory.name = name
        _REGISTRY[name] = factory
        return factory

    return add if factory is None else add(factory)


def get_transform(transform: str | Transform, **kwargs: Any) -> Transform:
    """The transform registered as ``transform``, built with ``kwargs``.

    The built transform's ``name`` is the registered one, also for a subclass of a
    built-in (registered as ``"myflip"``, a :class:`Flip` subclass is ``"myflip"``, not
    ``"flip"``). A :class:`Transform` instance is returned as it is, with its own name.

    Example:
        >>> get_transform("rotate", degrees=(-30, 30))
        Rotate(degrees=(-30.0, 30.0), align_corners=False)
    """
    if isinstance(transform, Transform):
        if kwargs:
            raise TypeError("keyword arguments apply to a transform name, not to a Transform instance")
        return transform
    given: object = transform  # checked as any object: a class passed for an instance is a common slip
    if isinstance(given, type) and issubclass(given, Transform):
        raise TypeError(
            f"transform must be a name or a Transform instance, got the class {given.__name__}: "
            f"pass {given.__name__}() or its registered name"
        )
    if not isinstance(transform, str):
        raise TypeError(f"transform must be a name or a Transform, got {type(transform).__name__}")
    if transform not in _REGISTRY:
        raise ValueError(f"unknown transform {transform!r}; available: {', '.join(available_transforms())}")
    built = _REGISTRY[transform](**kwargs)
    if not isinstance(built, Transform):
        raise TypeError(f"the factory registered as {transform!r} returned {type(built).__name__}, not a Transform")
    # The weights and terms of the loss are keyed by name: the name the user registered and
    # asked for, not one inherited from a base class.
    if built.name != transform:
        built.name = transform
    return built


def available_transforms() -> list[str]:
    """Names accepted by :func:`get_transform`, sorted."""
    return sorted(_REGISTRY)


for _cls in (Flip, Scale, Rotate, Translate):
    register_transform(_cls.name, _cls)
