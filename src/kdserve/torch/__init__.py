"""kdserve's PyTorch adapter (the optional ``torch`` extra): distillation losses.

Importing it without PyTorch installed raises an ImportError with the install command.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401 -- only checks that PyTorch is there
except ImportError:  # pragma: no cover - exercised in an environment without torch
    raise ImportError(
        "kdserve.torch needs PyTorch: pip install 'kdserve[torch]' (on a CPU-only machine, "
        "install a CPU build of torch first, e.g. pip install torch==2.13.0)"
    ) from None

from kdserve.torch.dataset import KnowledgeDataset
from kdserve.torch.losses import (
    FeatureProjector,
    feature_loss,
    kd_loss,
    sampled_token_kd_loss,
    topk_kd_loss,
)
from kdserve.torch.program import teacher_program

__all__ = [
    "FeatureProjector",
    "KnowledgeDataset",
    "feature_loss",
    "kd_loss",
    "sampled_token_kd_loss",
    "teacher_program",
    "topk_kd_loss",
]
