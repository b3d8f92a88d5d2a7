"""Pinned staging buffers: how a :class:`~kdserve.TeacherProgram` lane copies its inputs
to a CUDA device.

A copy from pageable (ordinary) host memory blocks the calling thread while the driver
stages it through pinned memory of its own. A :class:`Staging` keeps one pinned buffer
per input for its lane, copies each batch's array into it, and starts the copy to the
device without blocking: the lane's thread goes on to launch the forward pass while the
copy runs on the lane's stream. The buffers are reused, call after call (grown to the next
power of two when a larger batch comes), so no batch allocates host memory.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Staging", "to_tensor"]

_log = logging.getLogger(__name__)


class Staging:
    """One lane's host buffers, one per input name, reused by each of its calls.

    A lane runs one call at a time, so each :meth:`copy` first waits for the copies of
    the call before it to have left the buffers (they have, once that call copied its
    outputs back: the wait costs nothing then), then refills them. ``pin=False`` keeps
    ordinary memory, which needs no accelerator: the same buffers and copies, without
    the overlap.
    """

    def __init__(self, device: torch.device, *, pin: bool = True) -> None:
        self.device = device
        self.pin = pin
        self.buffers: dict[str, Tensor] = {}  # input name -> uint8 host buffer
        self._copied: torch.cuda.Event | None = None  # recorded after the last call's copies

    def copy(self, inputs: Sequence[tuple[str, Any]]) -> list[Tensor]:
        """One call's inputs on the device, in order. Arrays go through their name's
        buffer; a tensor, or an array torch cannot hold in a buffer (a dtype torch lacks,
        no bytes), is copied directly."""
        if self._copied is not None:
            self._copied.synchronize()
        out = [self._one(name, value) for name, value in inputs]
        if self.device.type == "cuda":
            if self._copied is None:
                self._copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._copied.record()  # on the current stream: the lane's
        return out

    def _one(self, name: str, value: Any) -> Tensor:
        array = value if isinstance(value, np.ndarray) else None
        if array is None or array.nbytes == 0:
            return to_tensor(name, value, self.device)
        try:
            dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
        except (TypeError, ValueError):  # a dtype or byte order torch lacks: it says which
            return to_tensor(name, value, self.device)
        staged = self._buffer(name, array.nbytes)[: array.nbytes].view(dtype).view(array.shape)
        np.copyto(staged.numpy(), array, casting="no")  # releases the GIL for large copies
        # copy=True: a fresh tensor even on the CPU, never the buffer the next call refills
        return staged.to(self.device, non_blocking=self.pin, copy=True)

    def _buffer(self, name: str, nbytes: int) -> Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < nbytes:
            size = 1 << (nbytes - 1).bit_length()  # room for somewhat larger batches to come
            try:
                buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            except RuntimeError as exc:  # no page-locked memory to be had: copies that block
                _log.warning(
                    "teacher_program: could not pin %d bytes for input %r (%s); its lane "
                    "copies from ordinary memory (pin_inputs=False avoids trying)",
                    size,
                    name,
                    str(exc).splitlines()[0],
                )
                self.pin = False
                buffer = torch.empty(size, dtype=torch.uint8)
            self.buffers[name] = buffer
        return buffer


def to_tensor(name: str, value: Any, device: torch.device) -> Tensor:
    """Feed ``name``'s ``value`` (an array, a tensor, nested lists) as a tensor on
    ``device``, without staging: zero-copy where it is on the CPU already."""
    if isinstance(value, Tensor):
        return value.to(device)
    try:
        array = value if isinstance(value, np.ndarray) else np.asarray(value)
    except ValueError:  # numpy refuses inhomogeneous (ragged) nested lists
        array = np.empty(0, dtype=object)
    if array.dtype == object:
        raise TypeError(
            f"feed {name!r} is ragged (an object array) and cannot become one tensor; pad it "
            f"in the reader, or leave it out of inputs="
        )
    if not array.flags.writeable:
        array = array.copy()  # torch warns about (and cannot safely share) read-only memory
    if device.type == "cpu" and array.dtype.isnative:
        # The same zero-copy tensor (and errors) as as_tensor's, but without its dispatch,
        # which lets go of the GIL: another thread would take it from the lane for ~0.1 ms.
        return torch.from_numpy(array)
    return torch.as_tensor(array, device=device)
