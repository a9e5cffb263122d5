"""TLS contexts, built one way for every service: a server's from its PEM files, a client's
that verifies against a private CA; and which hosts a plain connection may go to.

The relay serves `wss://` and verifies the oracle it long-polls; the oracle serves
`https://`; a device verifies `wss://` relays.  Each builds its contexts here, so
the minimum version and the error a bad file gives are the same everywhere.
"""

from __future__ import annotations

import ipaddress
import ssl


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """Serve TLS 1.2 or later with this certificate chain and key (PEM files)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def verifying_context(ca_file: str) -> ssl.SSLContext:
    """Verify servers against the CA bundle `ca_file` (PEM) instead of the system's store;
    ValueError naming the file if it cannot be read."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"CA file {ca_file}: {exc}") from None


def is_loopback_host(host: str) -> bool:
    """Whether `host` is this machine: the one place a plain ws:// or http:// link cannot be
    read or changed on the path."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
