"""One command-line behaviour for every entry point of the project.

    def main(argv: list[str] | None = None) -> int:
        p = cli.parser(__doc__)
        p.add_argument("--config", help="recipe YAML")
        a = p.parse_args(argv)
        ...                                  # raise UserError("... names what was wrong ...")
        return 0

    if __name__ == "__main__":
        cli.run(main)

What a user sees, whichever CLI it is:

- a user error (bad flag, missing file, bad row, unknown key, unreachable hub or scorer) is **one
  line** on stderr, ``<prog>: error: <what was wrong>``, exit code 2, no traceback; ``--debug``
  (anywhere on the command line) or ``ALIGNMENT_DEBUG=1`` shows the traceback as well;
- any other exception is a bug and keeps its traceback (exit 1);
- ``--help`` shows every default;
- CPU threads come from the cores the job was given (``SLURM_CPUS_PER_TASK``, else the process's
  affinity mask) unless ``OMP_NUM_THREADS`` is set: torch's own default counts every core of the
  host, which oversubscribes a SLURM allocation or a container's share.

This module sits on the bottom floor: it imports nothing of the project.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

EXIT_USER_ERROR = 2
DEBUG_FLAG = "--debug"


class UserError(Exception):
    """Something the user can fix (input, flag, file, service address); its message names it.

    Raised anywhere below a CLI; :func:`run` turns it into one line and exit code 2.
    """


# FileNotFoundError & co. come from user-given paths in practice; the message names the path.
_USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends ``(default: X)`` to every option."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: ``--debug`` accepted everywhere, defaults in
    ``--help``, and a usage error as one line (argparse prints the usage block first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of a user error")

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def parser(doc: str | None = None, **kwargs: Any) -> ArgumentParser:
    """An :class:`ArgumentParser` whose description is the module docstring (``__doc__``)."""
    if doc is not None:
        kwargs.setdefault("description", doc.strip())
    return ArgumentParser(**kwargs)


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get("ALIGNMENT_DEBUG", "") not in ("", "0")


def allotted_cpus() -> int:
    """Cores this process was given: ``SLURM_CPUS_PER_TASK``, else the affinity mask, else all."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(per_process: int | None = None) -> int:
    """Set the OpenMP/torch thread count from the allotment unless ``OMP_NUM_THREADS`` is set.

    ``per_process``: the threads each process may use (e.g. allotted cores // local processes);
    defaults to the whole allotment. The choice is exported so that child processes (DataLoader
    workers, scorer replicas, Ray actors started from here) inherit it. Returns the count in use.
    """
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = int(given) if given.isdigit() and int(given) > 0 else max(1, per_process or allotted_cpus())
    if not given:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # torch reads OMP_NUM_THREADS only when it is first imported
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return threads


def fail(message: str, prog: str | None = None) -> NoReturn:
    """Leave the process as a user error: one line on stderr, exit code 2."""
    prog = prog or os.path.basename(sys.argv[0]) or "alignment"
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(EXIT_USER_ERROR)


def user_error_message(exc: BaseException) -> str:
    """The one line shown for ``exc`` (an OSError keeps the path that it names)."""
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc.args):
        return f"{exc.strerror or exc}: {exc.filename}"
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split("\n"))


def run(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    user_errors: tuple[type[BaseException], ...] = (),
) -> NoReturn:
    """Call ``main(argv)`` with the project's CLI behaviour and exit with its status.

    ``user_errors``: further exception types that this CLI's library code raises for bad input.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    configure_threads()
    try:
        status = main(args)
    except _USER_ERROR_TYPES + user_errors as exc:
        if debug:
            traceback.print_exc()
        logging.shutdown()
        fail(user_error_message(exc), prog)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    raise SystemExit(0 if status is None else int(status))
