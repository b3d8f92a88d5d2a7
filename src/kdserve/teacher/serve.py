"""``kd.serve``: the online teacher in one call -- a :class:`Service` that serves a
program's knowledge in the background until its passes are read or it is closed."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kdserve.core.wait import slices
from kdserve.online.limits import Limits
from kdserve.teacher.encoder import Keep, Program, check_program
from kdserve.teacher.feeds import named_feeds
from kdserve.teacher.security import Pem
from kdserve.teacher.teacher import Teacher

__all__ = ["Service", "serve"]

_log = logging.getLogger(__name__)
_JOIN_WAIT = 35.0  # seconds close() waits for the service thread (the teacher waits 30 s)


class Service:
    """A teacher serving in the background (what :func:`serve` returns). ``wait()`` returns
    the samples served and re-raises the service's error; ``close()`` stops it."""

    def __init__(self, teacher: Teacher, run: Callable[[], int]) -> None:
        self.teacher = teacher
        self._served: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(run,), name=f"kdserve-service-{teacher.name}", daemon=True
        )
        self._thread.start()

    def _run(self, run: Callable[[], int]) -> None:
        try:
            self._served = run()
        except BaseException as exc:  # handed to wait()
            self._error = exc

    @property
    def address(self) -> str:
        """``host:port`` for ``Student.add_teacher``."""
        return self.teacher.address

    @property
    def token(self) -> str | None:
        """The token students need (published for this user on this host when generated)."""
        return self.teacher.token

    def wait(self, timeout: float | None = None) -> int:
        """Wait until every pass was served (a query-only service: until closed); return
        the samples served. Re-raises the service's error; TimeoutError after ``timeout``."""
        for step in slices(timeout):
            self._thread.join(step)
            if not self._thread.is_alive():
                break
        if self._thread.is_alive():
            raise TimeoutError(f"teacher {self.teacher.name!r} still serving after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._served or 0

    def close(self) -> None:
        """Stop serving (between two batches) and wait for the service to end."""
        self.teacher.close()
        self._thread.join(_JOIN_WAIT)
        if self._thread.is_alive():
            _log.warning(
                "teacher %s: its service did not end within %g s", self.teacher.name, _JOIN_WAIT
            )

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    program: Program,
    data: Any,
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    path: str | os.PathLike[str] | None = None,
    times: int = 1,
    token: str | None = None,
    tls_cert: Pem | None = None,
    tls_key: Pem | None = None,
    tls_client_ca: Pem | None = None,
    feeds: Sequence[str] | None = None,
    keep: Keep | None = None,
    use_fp16: bool = False,
    name: str | None = None,
    model: str | None = None,
    progress: bool | None = None,
    buf_size: int = 10,
    threads: int = 2,
    inference_threads: int | None = None,
    limits: Limits | None = None,
    provenance: Mapping[str, str | int | float | bool] | None = None,
) -> Service:
    """Serve ``program``'s knowledge over ``data`` on ``port`` (0: any free port) for
    ``times`` passes, in the background; returns once students can connect.

    ``data``, ``feeds``, ``keep`` and the thread options are as for :func:`dump`;
    ``data=None`` answers queries only (``feeds`` then names what a query must hold).
    ``path`` also writes the knowledge to a store in the first pass. Security options and
    ``limits`` are :class:`~kdserve.Teacher`'s: on 127.0.0.1 a token is generated and published for
    students of this user, elsewhere ``token=`` is required.
    """
    check_program(program, times)
    feed_list, reader = (list(feeds or []), None) if data is None else named_feeds(data, feeds)
    teacher = Teacher(
        path,
        port,
        host=host,
        token=token,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        name=name,
        model=model,
        progress=progress,
        limits=limits,
        provenance=provenance,
    )
    teacher.start()

    def run() -> int:
        try:
            return teacher.start_knowledge_service(
                feed_list,
                keep,
                program,
                reader,
                buf_size=buf_size,
                use_fp16=use_fp16,
                times=times,
                num_postprocess_threads=threads,
                num_inference_threads=inference_threads,
            )
        finally:
            if reader is not None:  # every pass served: stop listening
                teacher.close()

    return Service(teacher, run)
