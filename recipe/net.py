"""Small networking helpers with no heavy imports (scripts and tests use them too)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago ("" binds all interfaces)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
