"""Wait until the scorer answers ``GET /health``: what trainer jobs do before they start.

    python -m alignment.scoring.wait --address-dir logs/scorers --replicas 4 --timeout 1800
    python -m alignment.scoring.wait --address-file logs/scorer_address.json

prints the healthy scorers' URLs (comma-separated, the form ``$SCORER_URL`` takes) and exits 0 once
at least ``--replicas`` answer, or says on stderr what it last saw and exits 2. Without a flag it
looks where clients given ``url=auto`` look (``$SCORER_ADDRESS_DIR`` / ``$SCORER_ADDRESS_FILE``, else
``logs/scorers/`` and ``logs/scorer_address.json``).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from alignment import cli
from alignment.scoring.address import address_sources, read_addresses
from alignment.scoring.replicas import probe

logger = logging.getLogger(__name__)


class ScorerWaitTimeout(cli.UserError, TimeoutError):
    """No (or too few) healthy scorers within the time allowed; the message says what was seen."""


def healthy_scorers(sources: list[Path], timeout: float = 5.0) -> tuple[list[str], str]:
    """URLs in ``sources`` that answer healthy, and what the others showed."""
    addresses, notes = read_addresses(sources)
    healthy, seen = [], list(notes)
    with httpx.Client() as http:
        for address in addresses:
            problem = probe(http, address.url, timeout)
            if problem is None:
                healthy.append(address.url)
            else:
                seen.append(f"{address.url} ({address.source}): {problem}")
    return healthy, "; ".join(seen) or "nothing yet"


def wait_for_scorer(
    address_file: str | Path | None = None,
    url: str | None = None,
    timeout: float = 1800.0,
    poll: float = 2.0,
    token: str | None = None,
    address_dir: str | Path | None = None,
    replicas: int = 1,
) -> str:
    """Poll the address sources (or ``url``) until ``replicas`` scorers are healthy; return their
    URLs, comma-separated. ``token`` is unused (``/health`` needs none) and kept for callers.

    Raises :class:`ScorerWaitTimeout` naming what was waited for, for how long and what was last seen.
    """
    del token
    sources = [] if url else address_sources(address_file, address_dir)
    target = url or " and ".join(str(s) for s in sources)
    start = time.monotonic()
    while True:
        if url:
            with httpx.Client() as http:
                problem = probe(http, url.rstrip("/"), 5.0)
            healthy, last = ([url.rstrip("/")], "") if problem is None else ([], f"{url}: {problem}")
        else:
            healthy, last = healthy_scorers(sources)
        if len(healthy) >= replicas:
            return ",".join(healthy)
        waited = time.monotonic() - start
        if waited >= timeout:
            have = f"{len(healthy)} of {replicas} healthy ({', '.join(healthy)}); " if replicas > 1 else ""
            raise ScorerWaitTimeout(
                f"scorer not healthy after waiting {waited:.0f}s for {target}: {have}last saw {last}; "
                "start the scorer (slurm/run_scorer_service.sh) or check its log"
            )
        logger.debug("waiting for %s: %s", target, last)
        time.sleep(max(0.0, min(poll, timeout - waited)))


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(__doc__, prog="python -m alignment.scoring.wait")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--address-file", help="an address file, or a directory of them")
    src.add_argument("--address-dir", help="the directory the replicas publish into")
    src.add_argument("--url", help="wait for this URL instead of reading address files")
    p.add_argument("--replicas", type=int, default=1, help="healthy scorers to wait for")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between checks")
    p.add_argument("--token", default=None, help="ignored: /health needs no token (kept for old scripts)")
    a = p.parse_args(argv)
    if a.replicas < 1:
        p.error(f"--replicas must be at least 1, got {a.replicas}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per poll
    print(wait_for_scorer(a.address_file, a.url, a.timeout, a.poll, None, a.address_dir, a.replicas))
    return 0


if __name__ == "__main__":
    cli.run(main, prog="python -m alignment.scoring.wait")
