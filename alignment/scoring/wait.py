"""Wait until the scorer service answers ``GET /health``: what trainer jobs do before they start.

    python -m alignment.scoring.wait --address-file logs/scorer_address.json --timeout 1800

prints the scorer's URL and exits 0 once it is healthy, or explains on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import httpx

from alignment.scoring.address import default_address_file, read_address_file

logger = logging.getLogger(__name__)


def _check(url: str, token: str | None) -> str | None:
    """None when ``url`` is healthy, else a short description of what was seen."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.get(f"{url.rstrip('/')}/health", headers=headers, timeout=5.0)
    except httpx.ConnectError:
        return f"connection refused at {url}"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__} from {url}: {exc}"
    if resp.status_code != 200:
        try:
            why = resp.json().get("error")
        except (ValueError, AttributeError):
            why = None
        return f"HTTP {resp.status_code} from {url}/health" + (f" ({why})" if why else "")
    try:
        status = resp.json().get("status")
    except (ValueError, AttributeError):
        status = None
    return None if status == "healthy" else f"{url}/health answered status {status!r}"


def wait_for_scorer(
    address_file: str | Path | None = None,
    url: str | None = None,
    timeout: float = 1800.0,
    poll: float = 2.0,
    token: str | None = None,
) -> str:
    """Poll the address file (or ``url``) until the scorer is healthy; return its URL.

    Raises ``TimeoutError`` naming what was waited for, for how long and what was last seen.
    """
    path = None if url else Path(address_file) if address_file else default_address_file()
    target = url or f"address file {path}"
    start = time.monotonic()
    last = "nothing yet"
    while True:
        current = url
        if path is not None:
            try:
                current = read_address_file(path)
            except FileNotFoundError:
                last = f"address file {path} missing"
            except ValueError as exc:  # half-written or malformed
                last = str(exc)
        if current:
            problem = _check(current, token)
            if problem is None:
                return current
            last = problem
        waited = time.monotonic() - start
        if waited >= timeout:
            raise TimeoutError(
                f"scorer not healthy after waiting {waited:.0f}s for {target}: last saw {last}; "
                "start the scorer (slurm/run_scorer_service.sh) or check its log"
            )
        logger.debug("waiting for %s: %s", target, last)
        time.sleep(max(0.0, min(poll, timeout - waited)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m alignment.scoring.wait", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--address-file", help="default $SCORER_ADDRESS_FILE or logs/scorer_address.json")
    src.add_argument("--url", help="wait for this URL instead of reading an address file")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait (default 1800)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between checks (default 2)")
    p.add_argument("--token", default=None, help="bearer token to send (optional)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per poll
    try:
        url = wait_for_scorer(a.address_file, a.url, a.timeout, a.poll, a.token)
    except TimeoutError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
