"""kdserve: decoupled knowledge distillation.

Teachers produce knowledge (logits, soft labels, features) as Arrow batches, served
online or written to a store; students merge any mix of teachers by sample id and
read one stream re-batched to their own batch size. The root holds the user's API:
``dump``/``serve``/``Teacher`` for teachers, ``Student`` for students, schemas, codecs,
merge strategies, the store reader and the exceptions. The plumbing lives in the
packages ``core``, ``store``, ``online``, ``teacher`` and ``student``.
"""

import importlib
import logging
import warnings

from kdserve._version import __version__
from kdserve.core.batch import Knowledge, from_record_batch, to_record_batch
from kdserve.core.codecs import Bf16, Codec, Fp16, Int8, TopK
from kdserve.core.merge import Max, Mean, MergeStrategy, Min, Sum, Take, WeightedMean
from kdserve.core.ragged import Ragged
from kdserve.core.schema import SAMPLE_ID, Field, Schema
from kdserve.errors import (
    AlignmentError,
    AuthenticationError,
    CodecError,
    KdserveError,
    MergeError,
    ProtocolError,
    SchemaError,
    StoreError,
    StoreLockedError,
    TeacherUnavailableError,
)
from kdserve.log import show_status
from kdserve.online.limits import Limits
from kdserve.store import StoreReader, StoreWriter
from kdserve.student import Loader, Student, VocabMap
from kdserve.teacher import Service, Teacher, dump, serve

logging.getLogger("kdserve").addHandler(logging.NullHandler())

__all__ = [
    "SAMPLE_ID",
    "AlignmentError",
    "AuthenticationError",
    "Bf16",
    "Codec",
    "CodecError",
    "Field",
    "Fp16",
    "Int8",
    "KdserveError",
    "Knowledge",
    "Limits",
    "Loader",
    "Max",
    "Mean",
    "MergeError",
    "MergeStrategy",
    "Min",
    "ProtocolError",
    "Ragged",
    "Schema",
    "SchemaError",
    "Service",
    "StoreError",
    "StoreLockedError",
    "StoreReader",
    "StoreWriter",
    "Student",
    "Sum",
    "Take",
    "Teacher",
    "TeacherUnavailableError",
    "TopK",
    "VocabMap",
    "WeightedMean",
    "__version__",
    "dump",
    "from_record_batch",
    "serve",
    "show_status",
    "to_record_batch",
]

# Plumbing that the root exported before 0.2: still importable from here, with a warning
# that names its module.
_MOVED = {
    "Block": "kdserve.core.sampler",
    "Sampler": "kdserve.core.sampler",
    "Rebatcher": "kdserve.core.rebatch",
    "rebatch": "kdserve.core.rebatch",
    "Merger": "kdserve.core.merge",
    "strategy_from_spec": "kdserve.core.merge",
    "codec_from_spec": "kdserve.core.codecs",
    "concat_batches": "kdserve.core.batch",
    "iter_feed_batches": "kdserve.teacher.feeds",
}


def __getattr__(name: str) -> object:
    """Old root names of internal helpers resolve, with a DeprecationWarning."""
    module = _MOVED.get(name)
    if module is None:
        raise AttributeError(f"module 'kdserve' has no attribute {name!r}")
    warnings.warn(
        f"kdserve.{name} moved to {module}.{name}; import it from there",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)
