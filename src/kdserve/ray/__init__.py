"""kdserve on Ray (the ``ray`` extra): teacher pools that students find by name.

::

    import ray, kdserve as kd, kdserve.ray as kr
    ray.init()
    pool = kr.TeacherPool("lm-teachers", make_program, feeds=["tokens"], replicas=4,
                          num_gpus=1)
    pool.dump(lambda part, parts: my_batches(part, parts), "knowledge/lm")  # one store
    answers = kr.PoolClient("lm-teachers").query_stream(batches, decode=False)
    for batch in kr.PoolLoader("lm-teachers", my_data, rank=rank, world_size=world):
        ...                                  # inputs + knowledge, each batch once a pass
    pool.serve(lambda epoch, part, parts: my_batches(epoch, part, parts))
    student = kd.Student(rank=rank, world_size=world)
    student.add_pool("lm-teachers")          # passes over the pool's own data
    for batch in student.loader(batch_size=32):
        ...
    pool.scale(8)

Importing it without Ray raises an ImportError that gives the install command.
"""

from __future__ import annotations

try:
    import ray  # noqa: F401 -- checked here, used by the modules below
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("kdserve.ray needs Ray: pip install 'kdserve[ray]'") from exc

from kdserve.ray.loader import PoolLoader
from kdserve.ray.pool import NAMESPACE, PoolClient, TeacherPool, pool_status

__all__ = ["NAMESPACE", "PoolClient", "PoolLoader", "TeacherPool", "pool_status"]
