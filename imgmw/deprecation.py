"""Renamed keyword arguments: the old name keeps working for a while, with a :class:`DeprecationWarning`.

The public API speaks one vocabulary (``n_components``, ``n_iter``, ``generator``, ``sample_weight``;
docs/architecture.md). Where an older release used another word for the same idea (``k``, ``iters``,
``weight``), :func:`renamed_parameters` maps it onto the new name::

    >>> import warnings
    >>> @renamed_parameters(iters="n_iter")
    ... def run(*, n_iter: int = 1) -> int:
    ...     return n_iter
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     run(iters=3), caught[0].category.__name__
    (3, 'DeprecationWarning')
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, TypeVar
from collections.abc import Callable

import torch

__all__ = ["renamed_parameters", "generator_from_seed"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_parameters(**renames: str) -> Callable[[F], F]:
    """Decorator accepting the keyword arguments ``renames = {old: new}`` under their old names.

    A call with ``old=value`` warns (``DeprecationWarning`` naming both) and runs as ``new=value``; giving
    both names is a ``TypeError``, as Python reports a repeated argument.
    """
    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{func.__qualname__}() got both {old!r} and its new name {new!r}")
                    warnings.warn(f"{func.__qualname__}: the argument {old!r} is renamed {new!r}; the old name "
                                  f"will be removed", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


def generator_from_seed(seed: int | None, generator: torch.Generator | None, device: torch.device | str,
                        where: str) -> torch.Generator | None:
    """The generator of a function whose integer ``seed`` argument became ``generator``.

    ``seed`` given: a :class:`DeprecationWarning` and a generator on ``device`` seeded with it (giving both is a
    ``TypeError``); otherwise ``generator`` as it is (``None``: torch's global generator).
    """
    if seed is None:
        return generator
    if generator is not None:
        raise TypeError(f"{where}() got both 'seed' and its new name 'generator'")
    warnings.warn(f"{where}: the argument 'seed' is replaced by 'generator' (a torch.Generator); the old name will "
                  f"be removed", DeprecationWarning, stacklevel=3)
    return torch.Generator(device=device).manual_seed(seed)
