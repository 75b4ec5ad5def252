"""HTTP/1.1 over a plain socket, for tests that need what a client library hides: one connection
reused (or seen closed), a body shorter than its Content-Length, a socket that never speaks."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlsplit


def connect(url: str, timeout: float = 30.0) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def send_request(
    sock: socket.socket,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    content_length: int | None = None,
) -> None:
    """Send a request; ``content_length`` may claim more bytes than ``body`` holds."""
    lines = [f"{method} {path} HTTP/1.1", "Host: scorer"]
    fields = {"Content-Type": "application/json", **(headers or {})}
    if body or content_length is not None or method == "POST":
        fields["Content-Length"] = str(len(body) if content_length is None else content_length)
    lines += [f"{k}: {v}" for k, v in fields.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one response; ConnectionError if closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response (got {data[:200]!r})")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed in the middle of a response body")
        rest += chunk
    return int(status_line.split()[1]), headers, rest[:length]


def exchange(sock: socket.socket, method: str, path: str, payload: object | None = None, **kw) -> tuple:
    body = b"" if payload is None else json.dumps(payload).encode()
    send_request(sock, method, path, body, **kw)
    return read_response(sock)


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closes the connection (reading and discarding what it still sends, up to
    the socket's timeout, which then raises: a hang detector, not a timing claim)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True
