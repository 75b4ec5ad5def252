"""The scorer's address file: how jobs find the scorer without anyone pasting a hostname.

The service writes ``{"url": ..., "host": ..., "port": ..., "token": ..., ...}`` atomically, with
mode 0600 (it may hold the bearer token), once it listens; clients given ``url="auto"`` read it
(again after a connection failure, so a scorer restarted on another node or port is found). The
token in the file belongs to the URL in the same file and is sent nowhere else.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.atomic import write_text

ADDRESS_FILE_ENV = "SCORER_ADDRESS_FILE"
DEFAULT_ADDRESS_FILE = Path("logs") / "scorer_address.json"


def default_address_file() -> Path:
    """``$SCORER_ADDRESS_FILE``, else ``logs/scorer_address.json`` under the working directory."""
    return Path(os.environ.get(ADDRESS_FILE_ENV) or DEFAULT_ADDRESS_FILE)


def reachable_host(bind_host: str) -> str:
    """A host name other machines can use for a service bound to ``bind_host``.

    A wildcard bind (0.0.0.0, ::) is published as this node's address: the IP its host name resolves
    to, or the host name itself where that resolves only to loopback (as on many Debian images).
    """
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    name = socket.gethostname()
    try:
        ip = socket.gethostbyname(name)
    except OSError:
        return name
    return name if ip.startswith("127.") else ip


def write_address_file(
    path: str | Path, bind_host: str, port: int, token: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Atomically write the address file (mode 0600) and return what was written."""
    host = reachable_host(bind_host)
    url_host = f"[{host}]" if ":" in host else host
    info = {
        "url": f"http://{url_host}:{port}",
        "host": host,
        "port": port,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    if token is not None:
        info["token"] = token
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(info, indent=2) + "\n", mode=0o600)
    return info


@dataclass(frozen=True)
class ScorerAddress:
    """The URL of a scorer and the bearer token to send to that URL (None: no token)."""

    url: str
    token: str | None = None


def read_address(path: str | Path | None = None) -> ScorerAddress:
    """URL and token from one reading of the address file; a clear error when there is none yet."""
    path = Path(path) if path is not None else default_address_file()
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"scorer address file {path} does not exist: start the scorer first "
            f"(it writes this file once it listens), or pass the scorer URL explicitly"
        ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"scorer address file {path} is not valid JSON: {exc}") from exc
    url = info.get("url") if isinstance(info, dict) else None
    if not isinstance(url, str) or not url.startswith("http"):
        raise ValueError(f"scorer address file {path} has no 'url' entry")
    token = info.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError(f"scorer address file {path} has a 'token' that is not a non-empty string")
    return ScorerAddress(url.rstrip("/"), token)


def read_address_file(path: str | Path | None = None) -> str:
    """The URL in the address file; a clear error when there is none yet."""
    return read_address(path).url


def remove_address_file(path: str | Path) -> None:
    """Remove the file if this process wrote it (a newer scorer may have replaced it)."""
    path = Path(path)
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
