"""Engine base URLs: one rule for what is accepted, and one identity for finding duplicates.

An engine URL is `http(s)://host[:port]` with nothing after the optional '/'. Two URLs name the same
engine when their `url_identity` agrees: scheme and host compared without case, a trailing dot or
slash, the default port written out (80 / 443), an IPv4-mapped IPv6 address as its IPv4 form, and
`localhost` as `127.0.0.1`. Other loopback addresses stay distinct: servers bound to 127.0.0.1,
127.0.0.2 and ::1 on one port are three engines.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from eldr.errors import ConfigError

DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
MAX_URL_CHARS = 2048


def check_url(url: str) -> str:
    """An engine base URL without its trailing '/'; `ConfigError` naming the problem otherwise."""
    if not isinstance(url, str) or len(url) > MAX_URL_CHARS or not url.isprintable() or " " in url:
        raise ConfigError(f"engine URL must look like http://host:port, got {url!r:.200}")
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError outside 0-65535
    except ValueError:
        raise ConfigError(f"engine URL has an invalid port: {url!r}") from None
    if (
        parts.scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or url.endswith(("?", "#"))
    ):
        raise ConfigError(f"engine URL must look like http://host:port, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"engine URL must not hold credentials (use forward_auth: engine-key), got {url!r}")
    if parts.port == 0:
        raise ConfigError(f"engine URL has an invalid port: {url!r}")
    if _ip(parts.hostname) is None and not _HOST_NAME.fullmatch(parts.hostname):
        raise ConfigError(f"engine URL has an invalid host name: {url!r}")
    return url.rstrip("/")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def url_identity(url: str) -> str:
    """`scheme://host:port` with the host canonical: equal for URLs that name the same engine."""
    parts = urlsplit(check_url(url))
    scheme = parts.scheme.lower()
    host = str(parts.hostname).lower().rstrip(".")
    address = _ip(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address is not None:
        host = address.compressed  # 127.0.0.1, 127.0.0.2 and ::1 can be three different servers
    elif host == "localhost" or host.endswith(".localhost"):
        host = "127.0.0.1"  # what localhost resolves to here (and what a test engine binds)
    return f"{scheme}://{host}:{parts.port or DEFAULT_PORTS[scheme]}"
