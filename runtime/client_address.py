"""The address of the real client behind trusted proxies, for per-address budgets.

Behind a load balancer or ingress every socket comes from the proxy, so
budgets keyed on the socket's peer would put the whole fleet in one bucket.
The proxy says who connected in `X-Forwarded-For` or `Forwarded` (RFC 7239),
but anyone can send those headers, so they are believed only from peers in
`trusted` networks, and only as far as the chain stays inside them: reading
the chain right to left (nearest hop first), the first address that is not a
trusted proxy is the client.  A client cannot push itself further right than
its own hop, so it cannot pose as someone else behind the proxy.

Only the one header the deployment's proxies write is read.  A proxy passes
the other through as the client sent it (ingress-nginx, the chart's, appends
to `X-Forwarded-For` and forwards a client's `Forwarded` untouched), so
reading both, or preferring `Forwarded`, let a client name any address: it
then escaped its own address's budgets and spent a victim's.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from multidict import MultiMapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# The headers a proxy may write the client's address in (`--forwarded-header`).
X_FORWARDED_FOR, FORWARDED = "x-forwarded-for", "forwarded"
FORWARDED_HEADERS = (X_FORWARDED_FOR, FORWARDED)


@dataclass(frozen=True)
class ProxyTrust:
    """Which peers are our proxies, and which header they write the client's address in."""

    networks: tuple[Network, ...] = ()
    header: str = X_FORWARDED_FOR


def parse_networks(texts: Iterable[str]) -> tuple[Network, ...]:
    """CIDR networks (a bare address is a /32 or /128); ValueError names a bad entry."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return tuple(networks)


def are_networks(texts: Iterable[str]) -> bool:
    """Whether every entry parses, for a settings object's `validate`."""
    try:
        parse_networks(texts)
    except ValueError:
        return False
    return True


def client_address(peer: str, headers: MultiMapping[str], trust: ProxyTrust) -> str:
    """The client's address: `peer` itself unless `peer` is a trusted proxy that forwarded it.

    Every line of the header is read, in order, as one list (RFC 9110 §5.3): a proxy may
    add its own line after the client's instead of extending it (HAProxy's `option
    forwardfor`), and reading the first line alone believed the client's."""
    trusted = trust.networks
    if not trusted or not is_trusted(peer, trusted):
        return peer
    name = "Forwarded" if trust.header == FORWARDED else "X-Forwarded-For"
    lines = ", ".join(headers.getall(name, ()))
    hops = _forwarded_for(lines) if trust.header == FORWARDED else _x_forwarded_for(lines)
    for hop in reversed(hops):
        if not is_trusted(hop, trusted):
            return hop
    # Every hop is a proxy of ours (or nothing was forwarded): the leftmost is the origin.
    return hops[0] if hops else peer


def client_unit(address: str) -> str:
    """What one client controls, the key of per-address budgets: an IPv4 address, an IPv6
    /64 (one subscriber's allocation: a host picks any address in it, and each would
    otherwise be a fresh budget), an IPv4-mapped IPv6 address as its IPv4 one; anything
    that is no address, as given (at most 64 characters)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def is_trusted(text: str, trusted: tuple[Network, ...]) -> bool:
    """Whether `text` is an address inside one of the `trusted` networks."""
    address = _address(text)
    return address is not None and any(address in network for network in trusted)


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _forwarded_for(forwarded: str) -> list[str]:
    """The `for=` chain of a `Forwarded` header; unparseable hops kept as text (they are
    never trusted, so they end the walk as the client)."""
    hops = []
    for element in forwarded.split(","):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.lower() == "for" and value:
                hops.append(_strip_node(value.strip().strip('"')))
    return hops


def _x_forwarded_for(chain: str) -> list[str]:
    """The hops of an `X-Forwarded-For` header, as `_forwarded_for`."""
    return [hop.strip() for hop in chain.split(",") if hop.strip()]


def _strip_node(node: str) -> str:
    """RFC 7239 node: `192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711`, or `unknown`."""
    if node.startswith("["):
        return node[1:node.find("]")] if "]" in node else node
    if node.count(":") == 1:
        return node.partition(":")[0]
    return node
