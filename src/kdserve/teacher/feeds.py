"""Teacher data readers: Pantheon's three reader configs, or any iterable of batches.

Every form becomes a stream of feed batches: ``dict[feed name, ndarray | list]`` with
one entry per name of ``feed_list``, first axis = samples. Samples whose arrays differ
in shape (sequences) stay a list of arrays.

    {"sample_generator": g, "batch_size": n, "drop_last": False}  g() yields samples
    {"sample_list_generator": g}                                  g() yields lists of samples
    {"batch_generator": g}                                        g() yields batches
    any iterable of batches (a PyTorch DataLoader, a list, ...)

A sample is a tuple/list with one value per feed (a bare value if there is one feed)
or a dict; a batch is a tuple/list of per-feed arrays or a dict.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from kdserve.errors import SchemaError

__all__ = ["FeedBatch", "call_reader", "iter_feed_batches", "named_feeds"]

FeedBatch = dict[str, Any]

_FORMS = ("sample_generator", "sample_list_generator", "batch_generator")


def call_reader(source: Callable[..., Iterable[Any]] | Iterable[Any], pass_: int) -> Iterable[Any]:
    """Pantheon passes generator functions; a plain iterable is accepted too. A function
    that takes an argument is given the pass it serves (0, 1, ...), so that it can, say,
    shuffle each pass its own way."""
    if not callable(source):
        return source
    try:
        takes_pass = bool(inspect.signature(source).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        takes_pass = False
    return source(pass_) if takes_pass else source()


def iter_feed_batches(
    reader_config: Any, feed_list: Sequence[str], pass_: int = 0
) -> Iterator[FeedBatch]:
    """Turn any supported reader config into feed batches keyed by ``feed_list``, for pass
    ``pass_`` (given to reader functions that take an argument)."""
    feed_list = list(feed_list)
    if not feed_list or not all(isinstance(n, str) for n in feed_list):
        raise SchemaError(f"feed_list must be a non-empty list of names, got {feed_list!r}")
    if isinstance(reader_config, Mapping) and any(k in reader_config for k in _FORMS):
        forms = [k for k in _FORMS if k in reader_config]
        allowed = (
            {forms[0], "batch_size", "drop_last"} if forms == ["sample_generator"] else set(forms)
        )
        extra = set(reader_config) - allowed
        if len(forms) > 1 or extra:
            raise SchemaError(
                f"reader_config must hold exactly one of {list(_FORMS)} (plus batch_size and "
                f"drop_last for sample_generator); got keys {sorted(reader_config)}"
            )
        form = forms[0]
        source = reader_config[form]
        if form == "sample_generator":
            batch_size = reader_config.get("batch_size")
            if not isinstance(batch_size, int) or batch_size < 1:
                raise SchemaError(
                    f"sample_generator needs 'batch_size' (an int >= 1), got {batch_size!r}"
                )
            samples = call_reader(source, pass_)
            yield from _batch_samples(
                samples, batch_size, bool(reader_config.get("drop_last")), feed_list
            )
        elif form == "sample_list_generator":
            for samples in call_reader(source, pass_):
                yield _stack_samples(list(samples), feed_list)
        else:
            for batch in call_reader(source, pass_):
                yield _as_feed_batch(batch, feed_list)
        return
    if callable(reader_config) and not isinstance(reader_config, Iterable):
        reader_config = call_reader(reader_config, pass_)  # a function returning batches
    if isinstance(reader_config, Mapping) or not isinstance(reader_config, Iterable):
        raise SchemaError(
            f"reader_config must be a dict with one of {list(_FORMS)}, or an iterable of "
            f"batches (e.g. a DataLoader); got {type(reader_config).__name__}"
        )
    for batch in reader_config:
        yield _as_feed_batch(batch, feed_list)


def _batch_samples(
    samples: Iterable[Any], batch_size: int, drop_last: bool, feed_list: list[str]
) -> Iterator[FeedBatch]:
    chunk: list[Any] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == batch_size:
            yield _stack_samples(chunk, feed_list)
            chunk = []
    if chunk and not drop_last:
        yield _stack_samples(chunk, feed_list)


def _fields_of(item: Any, feed_list: list[str], what: str) -> list[Any]:
    """One value per feed from a tuple/list/dict (or a bare value when there is one feed)."""
    if isinstance(item, Mapping):
        missing = [n for n in feed_list if n not in item]
        if missing:
            raise SchemaError(f"a {what} lacks feed(s) {missing}; it has {sorted(item)}")
        return [item[n] for n in feed_list]
    # A tuple is always one value per feed; a list may also be one feed's batch of
    # sequences (ragged token ids), which share their number of dimensions: a list of
    # values that do not (a DataLoader's [inputs, labels]) is one value per feed.
    if (
        isinstance(item, tuple)
        or (isinstance(item, list) and len(feed_list) > 1)
        or (isinstance(item, list) and len({np.ndim(v) for v in item}) > 1)
    ):
        if len(item) != len(feed_list):
            raise SchemaError(
                f"a {what} has {len(item)} fields but feed_list names {len(feed_list)}: "
                f"{feed_list}; name a feed for each (e.g. an (inputs, labels) pair needs two), "
                f"or give a feed's value itself, not in a tuple"
            )
        return list(item)
    if len(feed_list) == 1:
        return [item[0] if isinstance(item, list) and len(item) == 1 else item]
    raise SchemaError(
        f"a {what} must be a tuple, list or dict with one value per feed {feed_list}, "
        f"got {type(item).__name__}"
    )


def _stack_samples(samples: list[Any], feed_list: list[str]) -> FeedBatch:
    columns = zip(*(_fields_of(s, feed_list, "sample") for s in samples), strict=True)
    batch: FeedBatch = {}
    for name, values in zip(feed_list, columns, strict=True):
        arrays = [np.asarray(v) for v in values]
        same = all(a.shape == arrays[0].shape for a in arrays)
        batch[name] = np.stack(arrays) if same else arrays
    return batch


def _as_feed_batch(batch: Any, feed_list: list[str]) -> FeedBatch:
    values = _fields_of(batch, feed_list, "batch")
    return {
        n: v if isinstance(v, list) and v and isinstance(v[0], np.ndarray) else np.asarray(v)
        for n, v in zip(feed_list, values, strict=True)
    }


def named_feeds(data: Any, feeds: Sequence[str] | None) -> tuple[list[str], Any]:
    """The feed names and the reader for the Pythonic calls: ``feeds`` if given, else the
    keys of the first batch (batches that are dicts name their feeds themselves). A
    one-shot iterator keeps its first batch."""
    if feeds is not None:
        return list(feeds), data
    if isinstance(data, Mapping) and any(k in data for k in _FORMS):
        raise SchemaError("a Pantheon reader config yields unnamed samples: pass feeds=[names]")
    if callable(data) and not isinstance(data, Iterable):  # a function of the pass
        first_pass = call_reader(data, 0)
        names, _ = named_feeds(first_pass if isinstance(first_pass, Iterable) else [], None)
        return names, data
    if not isinstance(data, Iterable):
        raise SchemaError(
            f"data must be an iterable of batches (e.g. a list of dicts or a DataLoader), got "
            f"{type(data).__name__}"
        )
    batches = iter(data)
    first = next(batches, None)
    if first is None:
        raise SchemaError("data yielded no batches")
    if not isinstance(first, Mapping):
        raise SchemaError(
            f"data's batches are {type(first).__name__}, not dicts: pass feeds=[names], one "
            f"per item of a batch"
        )
    if isinstance(data, Iterator):  # one pass only: put the first batch back
        data = itertools.chain([first], batches)
    return [str(k) for k in first], data
