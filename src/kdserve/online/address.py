"""Teacher addresses: the one parser of ``host:port`` (or a ``grpc[+tls|+tcp]://`` URI), and
whether a host is this machine's loopback (where same-host tokens may be looked up)."""

from __future__ import annotations

import ipaddress

from kdserve.errors import KdserveError

__all__ = ["is_loopback", "location", "split_address"]


def split_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or a ``grpc[+tls|+tcp]://host:port`` URI, else None."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 1 << 16:
        return None
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP address, IPv6 maybe in brackets) is this host's
    loopback: ``localhost`` or an address such as 127.0.0.1 or ::1."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def location(address: str, tls: bool) -> str:
    """The Flight location URI of ``host:port`` (a ``grpc://`` URI is taken as it is);
    KdserveError for anything else, so a typo fails at registration, not at a call."""
    if "://" in address:
        return address
    if split_address(address) is None:
        raise KdserveError(f"teacher address {address!r} is not host:port (e.g. 127.0.0.1:8470)")
    return f"{'grpc+tls' if tls else 'grpc'}://{address}"
