"""Run a PyTorch module as a kdserve teacher ``program``.

:func:`teacher_program` wraps an ``nn.Module`` into the callable that
:meth:`kdserve.Teacher.start_knowledge_service` expects -- a dict of feed arrays in, a
dict of numpy output arrays out -- in eval mode, under ``torch.inference_mode()``, on
one or several devices (one replica per device, calls spread over them), optionally
under ``torch.autocast``.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdserve.core.lanes import Lanes
from kdserve.core.ragged import Ragged
from kdserve.core.schema import SAMPLE_ID
from kdserve.torch.staging import Staging, to_tensor

__all__ = ["TeacherProgram", "teacher_program"]


class TeacherProgram:
    """Wrap ``module`` as a teacher ``program``: ``program(feed) -> {name: np.ndarray}``.

    **Inputs.** Each feed array is turned into a tensor on the replica's device (see
    *Pinned inputs*; on the CPU a tensor sharing the array's memory, no copy) and the
    module is called with them *positionally*: the feeds named by ``inputs``, in that
    order, or -- with ``inputs=None`` -- every feed in the feed dict's order (the
    teacher's ``feed_list`` order) except kdserve's ``sample_id``. Feeds not named in
    ``inputs`` (labels, ids) are not passed. A module that takes keyword arguments or
    needs feed preprocessing can be wrapped in a small ``nn.Module`` that does it.

    **Sequences.** A ragged input (token sequences of different lengths: a list of arrays
    or a :class:`~kdserve.Ragged`) is padded on the right with ``pad_value`` to
    ``(batch, max_len, ...)``; with ``mask_arg`` (e.g. ``"attention_mask"`` for a Hugging
    Face model) the module also gets the padding mask as that keyword (int64, 1 at real
    tokens). Every output of shape ``(batch, max_len, ...)`` comes back with
    ``<name>_lengths``, so the store keeps only the real positions; ``sequence_outputs``
    names them instead of this guess by shape (an output that is not per position, of a
    size that may equal ``max_len``, stays whole; ``[]``: none). A 2-D output of shape
    ``(batch, max_len)`` is one number per token or per sample alike: it must be named
    (ValueError until it is). Positions are not
    shifted: for a causal LM, knowledge position ``i`` is the distribution after token
    ``i``, predicting token ``i + 1``. Right padding leaves a causal model's real
    positions exact even without a mask (they never attend to later positions).

    **Outputs.** What the module returns is named by ``outputs``:

    * a ``Tensor``: it is named ``outputs`` (a str);
    * a tuple or list: ``outputs`` (a sequence of str) names its items, in order;
    * a dict (e.g. a Hugging Face ``ModelOutput``): its keys name the values, and
      ``outputs`` (a str or a sequence of str) selects the ones to keep -- each must be a key.

    Outputs come back as numpy arrays on the CPU. A mismatch between what the module
    returns and ``outputs`` raises a ``ValueError``/``TypeError`` saying how to fix it.

    **Devices.** ``devices`` defaults to ``["cuda"]`` when CUDA is available, else
    ``["cpu"]``. The module itself runs on the first device (it is moved there); each further
    device gets a ``copy.deepcopy`` of it. Calls go round-robin over the replicas, and calls
    from several threads run concurrently on different replicas: each replica runs one call
    at a time, and a call that finds every replica busy queues on the one with the fewest
    calls waiting (it starts the moment the one before it ends).

    **Streams.** ``streams=2`` lets each replica run two calls at once, each on its own
    CUDA stream (on a CPU: two threads), so that one batch's copy to the device and the
    copy of its outputs back overlap another batch's forward pass. The default is 2 when
    a device is a CUDA GPU and 1 otherwise (on an H100 a ResNet-50 dump ran at 0.85x the
    bare loop with one stream, and at 1.08x with two and float16 outputs). Two batches'
    activations are held at once: pass ``streams=1`` when one batch barely fits.
    ``.concurrency`` (``len(devices) * streams``, one per lane) is how many calls can run
    at once. ``.submit(feed)`` queues a call and returns its ``concurrent.futures.Future``
    at once; :func:`kdserve.dump`, :func:`kdserve.serve` and :class:`kdserve.Teacher` keep
    one call queued behind each running one that way, so a lane starts its next batch as
    one ends, without waiting for kdserve's thread to wake. (A function that wraps the
    program hides ``submit``: kdserve then calls it from a thread of its own, and each
    batch is handed over once more.)

    **Pinned inputs.** On a CUDA device each lane copies its inputs into pinned host
    buffers of its own, kept from call to call, and from there to the device without
    blocking its thread, so the copy overlaps the launch of the forward pass
    (``pin_inputs=False``: a plain copy from the feed's pageable memory, which blocks).
    The buffers hold one batch's inputs per lane.

    **Autocast.** With ``autocast`` (e.g. ``torch.bfloat16``) the forward pass runs under
    ``torch.autocast(device_type, dtype=autocast)`` and floating outputs are returned as
    float32 arrays. (bfloat16 outputs, which numpy cannot hold, always become float32.)

    **Top-k.** ``topk={"logits": 64}`` codes that output as :class:`~kdserve.TopK` on the
    device: log-probabilities (T=1) of its 64 largest entries, their indices and the tail
    mass come back as a dict of those components, which a store with a declared
    ``kd.TopK(64)`` field takes as is -- the full logits never reach the host.

    **Output dtype.** ``output_dtype=torch.float16`` casts floating outputs on the device,
    before they are copied to the host: half the bytes cross PCIe and nothing is left to
    convert on the host (the store then holds float16 knowledge, as ``use_fp16`` would).
    Values beyond float16's range raise ValueError rather than becoming inf.

    The module is put in eval mode. It exposes
    ``.module`` (the module given), ``.replicas`` (one module per device, ``replicas[0]`` is
    ``module``), ``.devices``, ``.streams``, ``.pin_inputs``, ``.inputs`` and ``.outputs``,
    for inspection.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        inputs: Sequence[str] | None = None,
        outputs: str | Sequence[str] = "logits",
        devices: Sequence[str | torch.device] | None = None,
        autocast: torch.dtype | None = None,
        output_dtype: torch.dtype | None = None,
        streams: int | None = None,
        pin_inputs: bool = True,
        mask_arg: str | None = None,
        pad_value: int | float = 0,
        topk: Mapping[str, int] | None = None,
        sequence_outputs: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"teacher_program needs a torch.nn.Module, got {type(module).__name__}; "
                f"wrap a plain function in an nn.Module (or pass it as the program directly)"
            )
        self.inputs: list[str] | None = None if inputs is None else _names("inputs", inputs)
        self.outputs: str | list[str] = (
            outputs if isinstance(outputs, str) else _names("outputs", outputs)
        )
        if autocast is not None and not (
            isinstance(autocast, torch.dtype) and autocast.is_floating_point
        ):
            raise TypeError(
                f"autocast must be a floating torch.dtype such as torch.bfloat16, got {autocast!r}"
            )
        self.autocast = autocast
        if output_dtype not in (None, torch.float16, torch.float32):
            raise TypeError(
                f"output_dtype must be torch.float16 or torch.float32 (numpy has no bfloat16), "
                f"got {output_dtype!r}"
            )
        self.output_dtype = output_dtype
        self.mask_arg = mask_arg
        self.pad_value = pad_value
        self.sequence_outputs: frozenset[str] | None = None
        if sequence_outputs is not None:
            if isinstance(sequence_outputs, str):
                raise TypeError(
                    f"sequence_outputs is a list of output names, got the str "
                    f"{sequence_outputs!r}; pass [{sequence_outputs!r}]"
                )
            self.sequence_outputs = frozenset(sequence_outputs)
        self.topk = dict(topk or {})
        bad = {
            n: k
            for n, k in self.topk.items()
            if isinstance(k, bool) or not isinstance(k, int) or k < 1
        }
        if bad:
            raise ValueError(f"topk maps output names to k >= 1, got {bad}")
        if devices is None:
            devices = ["cuda" if torch.cuda.is_available() else "cpu"]
        elif isinstance(devices, (str, torch.device)):
            devices = [devices]
        self.devices: list[torch.device] = [torch.device(d) for d in devices]
        if not self.devices:
            raise ValueError("devices must name at least one device, e.g. ['cuda:0', 'cuda:1']")
        self.module = module
        module.eval()
        if streams is None:
            streams = 2 if any(d.type == "cuda" for d in self.devices) else 1
        if not isinstance(streams, int) or isinstance(streams, bool) or streams < 1:
            raise ValueError(f"streams must be an int >= 1, got {streams!r}")
        self.streams = streams
        replicas = [module.to(self.devices[0])]
        replicas += [copy.deepcopy(module).to(d).eval() for d in self.devices[1:]]
        self.replicas: list[nn.Module] = replicas
        # What each lane runs on: (replica, CUDA stream or None); lane i is thread i of _calls.
        self._lanes = [
            (r, torch.cuda.Stream(d) if d.type == "cuda" else None)  # type: ignore[no-untyped-call]
            for _ in range(streams)
            for r, d in enumerate(self.devices)
        ]
        # Pinned buffers per CUDA lane, for copies that do not block its thread.
        self.pin_inputs = bool(pin_inputs)
        self._staging = [
            Staging(self.devices[r]) if stream is not None and self.pin_inputs else None
            for r, stream in self._lanes
        ]
        # Each lane runs its calls on a thread of its own, whichever thread calls: PyTorch
        # keeps some state per thread (cuDNN's autotuning results, cuBLAS handles), and a
        # new thread rebuilds it -- about a second of ResNet-50 autotuning on an H100 --
        # while each kd.dump or kd.serve submits its calls from a new thread of its own.
        self._calls = Lanes(len(self._lanes), "kdserve-lane")
        weakref.finalize(self, self._calls.stop)  # the threads end with the program
        _PROGRAMS.add(self)

    @property
    def concurrency(self) -> int:
        """How many calls can run at once (one per lane: ``len(devices) * streams``);
        kdserve keeps as many more queued behind them by default (see :meth:`submit`)."""
        return len(self._lanes)

    def __repr__(self) -> str:
        return (
            f"TeacherProgram({type(self.module).__name__}, inputs={self.inputs!r}, "
            f"outputs={self.outputs!r}, devices={[str(d) for d in self.devices]})"
        )

    def __call__(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        return self.submit(feed).result()

    def submit(self, feed: Mapping[str, Any]) -> Future[dict[str, Any]]:
        """Queue one call on a lane and return at once: the Future of its outputs (what
        ``program(feed)`` returns; its exception, if it fails). :func:`kdserve.dump` and
        :func:`kdserve.serve` keep a call queued behind each running one this way, so a
        lane starts its next batch the moment one ends, without waiting for the caller's
        thread to wake."""
        args_np, lengths = _pad_sequences(self._select(feed), self.pad_value)
        return self._calls.submit(self._run, args_np, lengths)

    def _run(
        self, lane: int, args_np: list[tuple[str, Any]], lengths: np.ndarray | None
    ) -> dict[str, Any]:
        """One call on ``lane``'s own thread."""
        try:
            return self._forward(lane, args_np, lengths)
        except torch.cuda.OutOfMemoryError as exc:
            if self.streams == 1:
                raise
            raise torch.cuda.OutOfMemoryError(
                f"{exc}\nkdserve: teacher_program runs {self.streams} batches at once on "
                f"each device (streams={self.streams}); pass streams=1 to hold one batch "
                f"at a time, or make the batches smaller"
            ) from exc

    def _forward(
        self, lane: int, args_np: list[tuple[str, Any]], lengths: np.ndarray | None
    ) -> dict[str, Any]:
        """The module on ``lane``'s replica and stream: inputs in, outputs named and on
        the host."""
        index, stream = self._lanes[lane]
        device = self.devices[index]
        on_stream = nullcontext() if stream is None else torch.cuda.stream(stream)
        with on_stream, torch.inference_mode(), self._autocast(device):
            staging = self._staging[lane]
            if staging is None:
                args = [to_tensor(name, value, device) for name, value in args_np]
            else:
                args = staging.copy(args_np)
            kwargs = {}
            if lengths is not None and self.mask_arg is not None:
                steps = torch.arange(_longest(lengths), device=device)
                mask = steps < torch.as_tensor(lengths, device=device)[:, None]
                kwargs[self.mask_arg] = mask.long()  # 1 at real tokens, as HF expects
            result = self.replicas[index](*args, **kwargs)
            named = self._name(result)
            out: dict[str, Any] = {}
            for name, value in named.items():
                coded = name in self.topk
                out[name] = self._top_k(name, value) if coded else self._to_numpy(name, value)
        if lengths is not None:  # (batch, max_len, ...) outputs: keep the real positions
            for name in self._per_position(out, lengths):
                out[f"{name}_lengths"] = lengths
        return out

    def _per_position(self, out: Mapping[str, Any], lengths: np.ndarray) -> list[str]:
        """The outputs that run over the ragged inputs' positions: ``sequence_outputs``
        (checked), else those shaped ``(batch, max_len, ...)``."""
        wanted = (len(lengths), _longest(lengths))
        shapes = {
            name: (value["values"] if isinstance(value, dict) else value).shape
            for name, value in out.items()
        }
        if self.sequence_outputs is None:
            flat = [n for n, shape in shapes.items() if len(shape) == 2 and shape == wanted]
            if flat:  # one number per token, or per sample with as many as max_len?
                raise ValueError(
                    f"output(s) {flat} have shape (batch, max_len) = {wanted}: name those "
                    f"holding one number per token in sequence_outputs=[...] (the others, "
                    f"per sample, stay whole; sequence_outputs=[] for none)"
                )
            return [name for name, shape in shapes.items() if shape[:2] == wanted]
        missing = sorted(self.sequence_outputs - set(out))
        if missing:
            raise ValueError(
                f"sequence_outputs names {missing}, which the module does not return; it "
                f"returns {sorted(out)}"
            )
        for name in sorted(self.sequence_outputs):
            if shapes[name][:2] != wanted:
                raise ValueError(
                    f"sequence_outputs output {name!r} has shape {shapes[name]}, not "
                    f"(batch, max_len, ...) = {wanted}; each row must hold a position per token"
                )
        return sorted(self.sequence_outputs)

    # -- feeds ------------------------------------------------------------------------

    def _select(self, feed: Mapping[str, Any]) -> list[tuple[str, Any]]:
        if self.inputs is None:
            return [(n, v) for n, v in feed.items() if n != SAMPLE_ID]
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise ValueError(
                f"teacher_program inputs {missing} are not in the feed, which has "
                f"{sorted(feed)}; add them to the teacher's feed_list or fix inputs="
            )
        return [(n, feed[n]) for n in self.inputs]

    # -- replicas ---------------------------------------------------------------------

    def _autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast)

    # -- outputs ----------------------------------------------------------------------

    def _name(self, result: Any) -> dict[str, Any]:
        wanted = self.outputs
        if isinstance(result, Tensor):
            if isinstance(wanted, str):
                return {wanted: result}
            if len(wanted) == 1:
                return {wanted[0]: result}
            raise ValueError(
                f"the module returned one tensor but outputs={wanted!r} names {len(wanted)}; "
                f"pass outputs='name' for a single tensor"
            )
        if isinstance(result, Mapping):
            keys = [wanted] if isinstance(wanted, str) else wanted
            missing = [k for k in keys if k not in result]
            if missing:
                raise ValueError(
                    f"the module returned a dict with keys {list(result)}, which lacks "
                    f"outputs {missing}; pass outputs= naming some of {list(result)}"
                )
            return {k: result[k] for k in keys}
        if isinstance(result, (tuple, list)):
            if isinstance(wanted, str):
                raise ValueError(
                    f"the module returned a {type(result).__name__} of {len(result)} items "
                    f"but outputs={wanted!r} names one; pass outputs=[...] with "
                    f"{len(result)} names, one per item in order"
                )
            if len(wanted) != len(result):
                raise ValueError(
                    f"the module returned a {type(result).__name__} of {len(result)} items "
                    f"but outputs={wanted!r} names {len(wanted)}; pass outputs= with "
                    f"{len(result)} names, one per item in order"
                )
            return dict(zip(wanted, result, strict=True))
        raise TypeError(
            f"the module returned a {type(result).__name__}; teacher_program needs a Tensor, "
            f"a tuple/list of Tensors or a dict of Tensors"
        )

    def _top_k(self, name: str, value: Any) -> dict[str, np.ndarray]:
        """Output ``name`` coded as :class:`~kdserve.TopK` where it was computed (on the
        device): log-probabilities at T=1 of the k largest entries of the last axis, their
        indices and the tail mass, so only ``k + 1`` numbers per position reach the host."""
        if not isinstance(value, Tensor) or not value.is_floating_point() or value.dim() < 2:
            raise TypeError(
                f"topk={{{name!r}: ...}} needs output {name!r} to be a floating tensor with a "
                f"last (vocabulary) axis, got {getattr(value, 'shape', type(value).__name__)}"
            )
        k, vocab = self.topk[name], value.shape[-1]
        if k > vocab:
            raise ValueError(f"topk={{{name!r}: {k}}} but output {name!r} has {vocab} entries")
        log_p = torch.log_softmax(value.detach().float(), dim=-1)
        values, indices = torch.topk(log_p, k, dim=-1)
        # The tail summed over the other entries themselves: 1 - (top-k mass) would lose
        # all precision for small tails, and not be 0 at k = vocab. In place (logsumexp
        # would hold another vocabulary-wide temporary): shifted by the largest of them.
        rest = log_p.scatter_(-1, indices, -torch.inf)
        peak = rest.amax(dim=-1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, 0.0)  # k = vocab: nothing left
        tail = rest.sub_(peak).exp_().sum(dim=-1).mul_(peak.squeeze(-1).exp())
        index_dtype = np.uint16 if vocab <= 1 << 16 else np.int32
        return {
            "values": values.cpu().numpy(),
            "indices": indices.to(torch.int32).cpu().numpy().astype(index_dtype),
            "tail": tail.cpu().numpy(),
        }

    def _to_numpy(self, name: str, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        if not isinstance(value, Tensor):
            raise TypeError(
                f"module output {name!r} is a {type(value).__name__}, not a Tensor; return "
                f"tensors, or leave {name!r} out of outputs="
            )
        # Each tensor method called here lets other threads take the GIL from this lane
        # (torch releases it in every op): call only those that do something.
        if value.requires_grad:
            value = value.detach()
        wide = overflowed = None
        if value.is_floating_point() and self.output_dtype is not None:
            wide, value = value, value.to(self.output_dtype)  # on the device, before the copy
            if value.dtype == torch.float16 and wide.dtype != torch.float16:
                overflowed = torch.isinf(value).any()  # queued on the device too
        elif value.is_floating_point() and (
            self.autocast is not None or value.dtype == torch.bfloat16
        ):
            value = value.float()
        array: np.ndarray = (value if value.is_cpu else value.cpu()).numpy()
        if overflowed is not None and wide is not None and bool(overflowed):
            _refuse_overflow(name, wide, value)
        return array


_PROGRAMS: weakref.WeakSet[TeacherProgram] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, a fork pool) has none of its parent's threads:
    its programs start lane threads of their own, with new locks."""
    for program in list(_PROGRAMS):
        program._calls.reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _refuse_overflow(name: str, wide: Tensor, half: Tensor) -> None:
    """ValueError if casting ``wide`` to float16 turned finite values into inf."""
    beyond = torch.isinf(half) & torch.isfinite(wide)
    if bool(beyond.any()):
        top = float(wide[beyond].abs().max())
        raise ValueError(
            f"output {name!r} has values beyond float16's range (max |x| = {top:.4g} > "
            f"65504) that output_dtype=torch.float16 would store as inf; leave output_dtype "
            f"unset (float32; a 'bf16' codec in keep= halves it too), or scale the output"
        )


def _names(what: str, names: Sequence[str]) -> list[str]:
    out = list(names)
    if not out or not all(isinstance(n, str) for n in out):
        raise TypeError(f"{what} must be a non-empty sequence of feed/output names, got {names!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} names {out} repeat a name; each must appear once")
    return out


def _pad_sequences(
    args: list[tuple[str, Any]], pad_value: int | float
) -> tuple[list[tuple[str, Any]], np.ndarray | None]:
    """Ragged inputs (a :class:`Ragged` or a list of arrays of different lengths) padded on
    the right to ``(batch, max_len, ...)`` with ``pad_value``; their lengths (None: no
    ragged input). Several ragged inputs must agree on every row's length."""
    lengths: np.ndarray | None = None
    out = []
    for name, value in args:
        ragged = _as_ragged(value)
        if ragged is None:
            out.append((name, value))
            continue
        if lengths is not None and not np.array_equal(lengths, ragged.lengths):
            raise ValueError(
                f"ragged input {name!r} has row lengths {ragged.lengths.tolist()}, unlike the "
                f"other ragged inputs ({lengths.tolist()}); sequences fed together must align"
            )
        lengths = ragged.lengths
        out.append((name, ragged.to_padded(pad_value)))
    return out, lengths


def _longest(lengths: np.ndarray) -> int:
    return int(lengths.max()) if len(lengths) else 0


def _as_ragged(value: Any) -> Ragged | None:
    """``value`` as a Ragged if it holds sequences -- of different lengths, or token ids
    (1-D integer arrays, which stay sequences when a batch's happen to be equally long)
    -- else None."""
    if isinstance(value, Ragged):
        return value
    if isinstance(value, (list, tuple)) and value:
        arrays = [np.asarray(v) for v in value]
        if not all(a.ndim >= 1 for a in arrays):
            return None
        tokens = all(a.ndim == 1 and a.dtype.kind in "iu" for a in arrays)
        if tokens or len({a.shape[0] for a in arrays}) > 1:
            return Ragged.from_list(arrays)
    return None


teacher_program = TeacherProgram
"""``teacher_program(module, inputs=..., outputs=..., devices=..., autocast=...,
output_dtype=..., streams=..., pin_inputs=..., mask_arg=..., pad_value=..., topk=...,
sequence_outputs=...)``: the name to call it by, as a function (see
:class:`TeacherProgram`)."""
