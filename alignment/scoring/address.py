"""Where scorers publish their address, and how clients find them: no hostname is ever pasted.

Every scorer replica, once it listens, atomically writes ``{"url", "host", "port", "token", "pid",
...}`` (mode 0600: it may hold the bearer token) to its own file in an address directory
(``--address-dir``, ``$SCORER_ADDRESS_DIR``, default ``logs/scorers/``; the file is named after its
host and port), or to one given ``--address-file`` (``$SCORER_ADDRESS_FILE``). Clients given
``url="auto"`` read every file of their sources (:func:`address_sources`) again whenever they look
for replicas, so restarted and added replicas are found. The token in a file belongs to the URL in
the same file and is sent nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignment.atomic import write_text

logger = logging.getLogger(__name__)

ADDRESS_FILE_ENV = "SCORER_ADDRESS_FILE"
ADDRESS_DIR_ENV = "SCORER_ADDRESS_DIR"
DEFAULT_ADDRESS_FILE = Path("logs") / "scorer_address.json"
DEFAULT_ADDRESS_DIR = Path("logs") / "scorers"


def default_address_file() -> Path:
    """``$SCORER_ADDRESS_FILE``, else ``logs/scorer_address.json`` under the working directory."""
    return Path(os.environ.get(ADDRESS_FILE_ENV) or DEFAULT_ADDRESS_FILE)


def default_address_dir() -> Path:
    """``$SCORER_ADDRESS_DIR``, else ``logs/scorers`` under the working directory."""
    return Path(os.environ.get(ADDRESS_DIR_ENV) or DEFAULT_ADDRESS_DIR)


def address_sources(
    address_file: str | Path | None = None, address_dir: str | Path | None = None
) -> list[Path]:
    """Where a client looks for scorers: the given file and/or directory; else ``$SCORER_ADDRESS_DIR``
    and/or ``$SCORER_ADDRESS_FILE``; else both defaults (``logs/scorers/`` and
    ``logs/scorer_address.json``). A source may be a file or a directory of address files."""
    given = [Path(p) for p in (address_dir, address_file) if p]
    if given:
        return given
    env = [Path(os.environ[k]) for k in (ADDRESS_DIR_ENV, ADDRESS_FILE_ENV) if os.environ.get(k)]
    return env or [DEFAULT_ADDRESS_DIR, DEFAULT_ADDRESS_FILE]


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


def replica_file(address_dir: str | Path, bind_host: str, port: int) -> Path:
    """The address file of the replica listening on ``port``: one per node and port, so a replica
    restarted on the same port replaces its own file and two replicas never share one."""
    host = reachable_host(bind_host).replace(":", "_").replace("/", "_")
    return Path(address_dir) / f"scorer-{host}-{port}.json"


def publish_path(address_file: str | None, address_dir: str | None, bind_host: str, port: int) -> Path:
    """Where a scorer publishes: ``--address-file``, else a file of its own in ``--address-dir``,
    else ``$SCORER_ADDRESS_FILE``, else a file of its own in ``$SCORER_ADDRESS_DIR`` or
    ``logs/scorers``. An "address file" that is a directory (or ends in ``/``) means a file of its
    own in that directory, so one variable can name either for every job."""
    address_file = address_file or (None if address_dir else os.environ.get(ADDRESS_FILE_ENV))
    if address_file and not is_directory(address_file):
        return Path(address_file)
    return replica_file(address_file or address_dir or default_address_dir(), bind_host, port)


def is_directory(path: str | Path) -> bool:
    """Whether an address path names a directory: it is one, or it ends in ``/``."""
    return str(path).endswith("/") or Path(path).is_dir()


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
    """The URL of a scorer and the bearer token to send to that URL (None: no token); ``source`` is
    the address file it was read from (None for a URL given by hand)."""

    url: str
    token: str | None = None
    source: Path | None = None
    pid: int | None = None
    hostname: str | None = None


def read_address(path: str | Path | None = None) -> ScorerAddress:
    """URL and token from one reading of one address file; a clear error when there is none yet."""
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
    pid = info.get("pid")
    hostname = info.get("hostname")
    return ScorerAddress(
        url.rstrip("/"),
        token,
        path,
        pid if isinstance(pid, int) else None,
        hostname if isinstance(hostname, str) else None,
    )


def read_address_file(path: str | Path | None = None) -> str:
    """The URL in the address file; a clear error when there is none yet."""
    return read_address(path).url


def read_addresses(sources: list[Path]) -> tuple[list[ScorerAddress], list[str]]:
    """Every address in ``sources`` (files, or directories of ``*.json`` address files), one per URL
    (the most recently written file wins), and a note for each source or file that gave none."""
    found: dict[str, tuple[float, ScorerAddress]] = {}
    notes: list[str] = []
    for source in sources:
        if source.is_dir():
            files = sorted(p for p in source.glob("*.json") if not p.name.startswith("."))
            if not files:
                notes.append(f"address directory {source} holds no address file")
        elif source.exists():
            files = [source]
        else:
            notes.append(f"{source} is missing")
            continue
        for path in files:
            try:
                address, written = read_address(path), path.stat().st_mtime
            except (OSError, ValueError) as exc:  # removed meanwhile, or not an address file
                notes.append(str(exc))
                continue
            if address.url not in found or written >= found[address.url][0]:
                found[address.url] = (written, address)
    return [address for _, address in found.values()], notes


def remove_address_file(path: str | Path) -> None:
    """Remove the file if this process wrote it (a newer scorer may have replaced it)."""
    path = Path(path)
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
