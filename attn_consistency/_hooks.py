"""Weak hooks and the recording base that CAMHook and MultiScaleHeads share."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind DistributedDataParallel / DataParallel / torch.compile."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(inner := getattr(model, "_orig_mod", None), nn.Module):
            model = inner
        else:
            return model


def _remove_handles(handles: list[RemovableHandle]) -> None:
    """Take every hook of ``handles`` off its module, and forget them."""
    for handle in handles:
        handle.remove()
    handles.clear()


def _remove_all(hooks: dict[str, list[RemovableHandle]]) -> None:
    """:func:`_remove_handles` for every group of ``hooks``."""
    for handles in hooks.values():
        _remove_handles(handles)


class _Undecided(ValueError):
    """The first forward cannot tell which modules are the head (no finite value, no sample)."""


class _NeedsGrad(RuntimeError):
    """A Grad-CAM forward ran without gradients: an error of that call, not of the architecture."""


class _Removable(Protocol):
    """What a :class:`_WeakHook` calls into: a recorder (CAMHook, MultiScaleHeads) that can remove its hooks."""

    def remove(self) -> None: ...


class _WeakHook:
    """A hook calling ``cam.<method>(*bound, *hook_args)`` that holds no reference to ``cam``.

    A CAMHook the user dropped without remove() then stops recording, and its finalizer
    takes the hooks off the model; a strong reference from the model would keep every
    forgotten hook recording (and its maps in memory). A hook that raises first removes
    every hook of its CAMHook: left on the model, they would fail again at every later
    forward, even at plain inference or through a new, correct CAMHook. A copy of the model
    (deepcopy for an EMA teacher, pickling) gets inert hooks: its forwards are not this
    CAMHook's to record.
    """

    __slots__ = ("_ref", "_method", "_bound")

    def __init__(self, cam: _Removable | None, method: str = "", *bound: object) -> None:
        self._ref = weakref.ref(cam) if cam is not None else None
        self._method = method
        self._bound = bound

    # Traced under torch.compile, not torch.compiler.disable'd at import (that decorator imports
    # torch._dynamo, about half of this package's import time, for every user). Once the first forward
    # has found and checked the head, the recording hooks are tensor code and a list append, which
    # dynamo keeps in the model's graph: a forward compiles with fullgraph=True (tests/test_compile.py).
    # That graph guards on how many entries are kept: pop() after each step, as views() does, or
    # it recompiles once per count, up to dynamo's recompile limit, and then runs eagerly.
    # The first forward's work reads values and adds and removes hooks: under compile it runs eagerly
    # (a graph break in that forward only), through a wrapper made when it is first needed.
    def __call__(self, *args: Any) -> None:
        owner = self._ref() if self._ref is not None else None
        if owner is None:
            if self._ref is None and args and isinstance(args[0], nn.Module):
                _forget(args[0], self)  # a copy's hook: no handle can remove it, so it removes itself
            return
        if torch.compiler.is_compiling() and getattr(owner, "_pending", False):
            _eager_call()(self, owner, args)
            return
        self._call(owner, args)

    def _call(self, owner: _Removable, args: tuple[Any, ...]) -> None:
        try:
            getattr(owner, self._method)(*self._bound, *args)
        except (_Undecided, _NeedsGrad):
            raise
        except Exception:
            owner.remove()
            raise

    def __reduce__(self) -> tuple[type[_WeakHook], tuple[None]]:
        return _WeakHook, (None,)

    def __deepcopy__(self, memo: dict[int, object]) -> _WeakHook:
        return _WeakHook(None)


_EAGER: list[Callable[[_WeakHook, _Removable, tuple[Any, ...]], None]] = []


def _eager_call() -> Callable[[_WeakHook, _Removable, tuple[Any, ...]], None]:
    """:meth:`_WeakHook._call`, run eagerly under torch.compile (made, and torch._dynamo imported, at the first need)."""
    if not _EAGER:
        _EAGER.append(torch.compiler.disable(_WeakHook._call))  # type: ignore[no-untyped-call]
    return _EAGER[0]


def _forget(module: nn.Module, hook: _WeakHook) -> None:
    """Take ``hook`` off ``module`` (torch iterates over a copy of the hooks: safe inside a call)."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [key for key, value in hooks.items() if value is hook]:
            del hooks[key]


class _Recording:
    """What a recorder of one entry per forward shares (CAMHook, MultiScaleHeads): the entries
    kept until :meth:`pop`, at most ``max_stored`` of them, and :meth:`paused`."""

    max_stored: int
    enabled: bool
    _stored: list[Any]
    _warned_overflow: bool

    def pop(self) -> list[Any]:
        """What every forward since the last call recorded, oldest first; then forget it."""
        stored, self._stored = self._stored, []
        return stored

    def clear(self) -> None:
        """Forget what was recorded so far."""
        self._stored = []

    def __len__(self) -> int:
        return len(self._stored)

    @contextmanager
    def paused(self) -> Iterator[Any]:
        """Record nothing inside the block (an evaluation loop that needs no heatmaps).

        CAMHook's first-forward detection and check still run on a paused forward.
        """
        enabled, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = enabled

    def _keep(self, entry: Any) -> None:
        """Store one forward's entry, dropping the oldest (with one warning) beyond ``max_stored``."""
        if len(self._stored) >= self.max_stored:
            self._stored.pop(0)
            if not self._warned_overflow:
                self._warned_overflow = True
                name = type(self).__name__
                warnings.warn(
                    f"{name}: {self.max_stored} forwards were recorded without pop(); the oldest are dropped. Call "
                    f"pop() after each step, or pause the {name} (`with recorder.paused():`) around forwards that "
                    "need no heatmaps.",
                    stacklevel=3,
                )
        self._stored.append(entry)
