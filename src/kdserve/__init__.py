"""kdserve: decoupled knowledge distillation.

Teachers produce knowledge (logits, soft labels, features) as Arrow batches, served
online or written to a store; students merge any mix of teachers by sample id and
read one stream re-batched to their own batch size.
"""

import logging

from kdserve.core.batch import Knowledge, concat_batches, from_record_batch, to_record_batch
from kdserve.core.codecs import Bf16, Codec, Fp16, Int8, TopK, codec_from_spec
from kdserve.core.merge import (
    Max,
    Mean,
    Merger,
    MergeStrategy,
    Min,
    Sum,
    Take,
    WeightedMean,
    strategy_from_spec,
)
from kdserve.core.ragged import Ragged
from kdserve.core.rebatch import Rebatcher, rebatch
from kdserve.core.sampler import Block, Sampler
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
from kdserve.store import StoreReader, StoreWriter
from kdserve.student import Student
from kdserve.teacher import Teacher
from kdserve.teacher.feeds import iter_feed_batches

logging.getLogger("kdserve").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "SAMPLE_ID",
    "AlignmentError",
    "AuthenticationError",
    "Bf16",
    "Block",
    "Codec",
    "CodecError",
    "Field",
    "Fp16",
    "Int8",
    "KdserveError",
    "Knowledge",
    "Max",
    "Mean",
    "MergeError",
    "MergeStrategy",
    "Merger",
    "Min",
    "ProtocolError",
    "Ragged",
    "Rebatcher",
    "Sampler",
    "Schema",
    "SchemaError",
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
    "WeightedMean",
    "__version__",
    "codec_from_spec",
    "concat_batches",
    "from_record_batch",
    "iter_feed_batches",
    "rebatch",
    "strategy_from_spec",
    "to_record_batch",
]
