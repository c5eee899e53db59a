"""The HTTP port, checked before anything starts (both serving modes)."""

from __future__ import annotations

import socket


def check_port_free(host: str, port: int) -> None:
    """OSError-free check, before a model loads or Ray starts: ValueError when host:port cannot be bound here."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server there? --port)") \
                from None
