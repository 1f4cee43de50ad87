"""Memory that autograd keeps for a backward pass, measured by the bytes of the tensors it saves."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SavedTensorMeter"]


class SavedTensorMeter:
    """Bytes of the distinct storages autograd saves for backward while the context is active.

    Counts every tensor packed through :func:`torch.autograd.graph.saved_tensors_hooks` (forward graphs, and
    graphs built inside a backward pass that runs in the context) once per storage; packed storages are kept
    alive until the meter is dropped, so that a freed address is never reused and merged with another.

    >>> a = torch.ones(10, dtype=torch.float64, requires_grad=True)
    >>> with SavedTensorMeter() as meter:
    ...     b = a * a  # saves a (twice: one storage)
    >>> meter.bytes
    80
    """

    def __init__(self) -> None:
        self.storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage
        return t

    @property
    def bytes(self) -> int:
        """Total bytes of the distinct storages saved so far."""
        return sum(storage.nbytes() for storage in self.storages.values())

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def _unpack(t: Tensor) -> Tensor:
    return t
