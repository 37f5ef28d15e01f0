"""Outbound address guard: which IP addresses an image fetch or a webhook may connect to.

The check sits where the socket is opened (an httpx transport whose network backend resolves the
host, vets every address, then connects to a vetted one), so neither a redirect nor a DNS answer
that changes between a check and the connect (DNS rebinding) can slip through. Cloud metadata
endpoints are refused always, even when private addresses are allowed: one fetch of them can hand
out the machine's cloud credentials.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from scalecap.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "192.0.0.192",  # Oracle Cloud
        "100.100.100.200",  # Alibaba Cloud
    )
)
"""Instance metadata services: refused even with private addresses allowed."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """A connection to this address is not allowed by the policy."""


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address inside a v4-mapped, 6to4 or NAT64 IPv6 address, if any."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_metadata(ip: IPAddress) -> bool:
    """Is this a cloud metadata endpoint, directly or wrapped in an IPv6 form?"""
    inner = _embedded_v4(ip)
    return ip in METADATA_ADDRESSES or (inner is not None and inner in METADATA_ADDRESSES)


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why an address is not a public one (None when it is), looking inside v4-in-v6 forms."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return forbidden_reason(ip.ipv4_mapped)
        if ip.sixtofour is not None and forbidden_reason(ip.sixtofour):
            return "6to4 of " + str(forbidden_reason(ip.sixtofour))
        if ip in _NAT64:
            return forbidden_reason(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for attr in ("loopback", "link_local", "unspecified", "multicast", "private", "reserved"):
        if getattr(ip, "is_" + attr):
            return attr.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


def parse_networks(networks: Iterable[str], what: str = "allowed_networks") -> tuple[Any, ...]:
    try:
        return tuple(ipaddress.ip_network(n, strict=False) for n in networks)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses only, unless `allow_private`; `networks` are exempt private ranges."""

    allow_private: bool = False
    networks: tuple[Any, ...] = ()
    setting: str = "allow_private_urls"
    """Named in refusals, so an operator knows which switch applies."""

    def refusal(self, ip: IPAddress) -> str | None:
        """Why a connection to `ip` is refused, or None."""
        if is_metadata(ip):
            return "a cloud metadata address: always refused"
        if self.allow_private:
            return None
        reason = forbidden_reason(ip)
        if reason and not any(ip in net for net in self.networks):
            return f"a {reason} address: refused ({self.setting} is off)"
        return None

    def vetted_addresses(self, host: str, port: int) -> list[str]:
        """Every address `host` resolves to, or AddressRefused if any one of them is refused."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addrs = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for addr in addrs:
            reason = self.refusal(ipaddress.ip_address(addr.split("%", 1)[0]))
            if reason:
                shown = f"host {host}" + ("" if host == addr else f" resolves to {addr}")
                raise AddressRefused(f"{shown}, {reason}")
        return addrs


_lock = threading.Lock()
_classes: dict[str, type] = {}


def guarded_transport(policy: AddressPolicy) -> Any:
    """An httpx transport whose every TCP connection goes to an address `policy` allows.

    TLS still verifies the original host name. AddressRefused propagates out of the request
    unchanged (it is not an httpx error), so callers can tell a refusal from a network failure.
    """
    with _lock:
        if not _classes:
            _classes["transport"] = _build_transport_class()
    return _classes["transport"](policy)


def _build_transport_class() -> type:
    import httpcore
    import httpx

    class GuardedBackend(httpcore.SyncBackend):
        def __init__(self, policy: AddressPolicy) -> None:
            self.policy = policy

        def connect_tcp(
            self,
            host: str,
            port: int,
            timeout: float | None = None,
            local_address: str | None = None,
            socket_options: Any = None,
        ) -> Any:
            try:
                addrs = self.policy.vetted_addresses(host, port)
            except (socket.gaierror, UnicodeError) as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
            error: Exception = httpcore.ConnectError(f"no address for {host}")
            for addr in addrs:
                try:
                    return super().connect_tcp(addr, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    error = exc
            raise error

    class GuardedTransport(httpx.HTTPTransport):
        def __init__(self, policy: AddressPolicy) -> None:
            super().__init__(trust_env=False)
            self._pool = httpcore.ConnectionPool(
                ssl_context=ssl_context(), network_backend=GuardedBackend(policy)
            )

    return GuardedTransport


_ssl: list[Any] = []


def ssl_context() -> Any:
    """One verified TLS context per process: building one reads the CA bundle."""
    import httpx

    with _lock:
        if not _ssl:
            _ssl.append(httpx.create_ssl_context())
    return _ssl[0]
