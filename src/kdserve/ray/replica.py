"""One replica of a teacher pool: the user's program in a Ray actor, answering queries
over Arrow Flight and dumping its part of a dataset. A replica Ray restarts after a
crash serves on a new port and registers it again, so students find it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from kdserve.teacher.dump import dump
from kdserve.teacher.encoder import Keep
from kdserve.teacher.serve import Service, serve

__all__ = ["Replica"]


class Replica:
    """A pool's teacher: ``program_factory()`` built once per (re)start, served for
    queries on ``host``, registered with the pool's ``registry`` actor as ``name``."""

    def __init__(
        self,
        name: str,
        registry: Any,
        program_factory: Callable[[], Any],
        feeds: Sequence[str],
        keep: Keep | None,
        host: str,
        token: str,
    ) -> None:
        self.name = name
        self.program = program_factory()
        self.keep = keep
        self.samples = 0  # dumped by this process
        self.busy = 0.0  # seconds spent dumping
        self.service: Service = serve(
            self.program, None, feeds=list(feeds), keep=keep, host=host, token=token,
            progress=False, name=name,
        )  # fmt: skip
        import ray

        ray.get(registry.register.remote(name, self.service.address))

    def address(self) -> str:
        """Where this replica answers queries."""
        return self.service.address

    def dump(
        self,
        data_factory: Callable[[int, int], Iterable[Mapping[str, Any]]],
        part: int,
        parts: int,
        path: str,
        options: Mapping[str, Any],
    ) -> int:
        """Dump part ``part`` of ``parts`` of the data into the store at ``path`` (resumed
        if it exists); returns the samples it holds."""
        start = time.perf_counter()
        written = dump(self.program, data_factory(part, parts), path, keep=self.keep, **options)
        self.samples += written
        self.busy += time.perf_counter() - start
        return written

    def stats(self) -> dict[str, Any]:
        """This replica's figures: address, samples dumped and their rate."""
        rate = self.samples / self.busy if self.busy else 0.0
        return {"address": self.service.address, "samples": self.samples, "samples_per_s": rate}
