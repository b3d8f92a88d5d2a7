"""Security: who may talk to an online teacher -- its token (given, from the environment,
or generated and published for students of this user on this host) and its TLS keys."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from kdserve.errors import KdserveError
from kdserve.online.tokens import (
    TOKEN_ENV,
    given_token,
    is_loopback,
    publish_token,
    remove_token,
)

__all__ = ["Security"]

Pem = bytes | str | os.PathLike[str]


class Security:
    """A teacher's credentials. ``token`` (or ``KDSERVE_TOKEN``) is required beyond
    loopback; on 127.0.0.1 one is generated and published in a 0600 file while serving.
    ``tls_cert``/``tls_key`` turn on TLS, ``tls_client_ca`` asks students for a
    certificate (mutual TLS). PEM values are bytes or file paths."""

    def __init__(
        self,
        token: str | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        tls_client_ca: Pem | None = None,
    ) -> None:
        self.token = given_token(token)
        self.generated = False
        if (tls_cert is None) != (tls_key is None):
            raise KdserveError("TLS needs both tls_cert= and tls_key= (PEM bytes or file paths)")
        self.tls = None if tls_cert is None or tls_key is None else (_pem(tls_cert), _pem(tls_key))
        self.client_ca = None if tls_client_ca is None else _pem(tls_client_ca)
        self._token_file: Path | None = None

    def token_for(self, host: str, teacher: str) -> str:
        """The token to serve with on ``host``: the given one, or a generated one on loopback."""
        if self.token is None:
            if not is_loopback(host):
                raise KdserveError(
                    f"teacher {teacher!r} would listen on {host} without a token: pass "
                    f"token= or set {TOKEN_ENV} (only 127.0.0.1 gets a generated token)"
                )
            self.token = secrets.token_urlsafe(18)
            self.generated = True
        return self.token

    def publish(self, port: int) -> Path | None:
        """Publish a generated token for students of this user on this host; the file."""
        if self.generated and self.token is not None:
            self._token_file = publish_token(port, self.token)
        return self._token_file

    def withdraw(self) -> None:
        """Remove the published token file (the teacher stopped serving)."""
        if self._token_file is not None:
            remove_token(self._token_file)
            self._token_file = None


def _pem(value: Pem) -> bytes:
    """PEM bytes, given as bytes or as a file path."""
    return value if isinstance(value, bytes) else Path(value).read_bytes()
