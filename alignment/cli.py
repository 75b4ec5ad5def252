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
import copy
import logging
import os
import re
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


class InputError(UserError, ValueError):
    """A bad value in user-given input (a row of a data file, a flag's value): a ``UserError`` that
    is also a ``ValueError``, so code that already catches ``ValueError`` keeps working."""


# FileNotFoundError & co. come from user-given paths in practice; the message names the path.
_USER_ERROR_TYPES: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


_MENTIONS_DEFAULT = re.compile(r"\bdefault\b", re.IGNORECASE)


def _has_default(action: argparse.Action) -> bool:
    """Whether ``--help`` should name the action's default (options and optional positionals)."""
    if action.default is argparse.SUPPRESS or isinstance(
        action, (argparse._HelpAction, argparse._VersionAction)
    ):
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and shows every option's default: ``(default: X)`` is
    appended unless the help text already says what the default is (e.g. "default: every model"),
    and an option without help text gets that line alone (argparse's own formatter shows nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _has_default(action) or "%(default)" in text or _MENTIONS_DEFAULT.search(text):
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.help is not argparse.SUPPRESS and _has_default(action):
            action = copy.copy(action)  # argparse skips the help line of an action without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: ``--debug`` accepted everywhere, defaults in
    ``--help``, a usage error as one line (argparse prints the usage block first), and no
    abbreviated flags (``--lr`` must not silently mean ``--lr_scheduler``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
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


# set beside OMP_NUM_THREADS when configure_threads chose the value, so that a later call (or a child
# process) can tell its own choice from one the user or the job made
_CHOSEN_ENV = "ALIGNMENT_THREADS_CHOSEN"


def user_threads() -> int | None:
    """``OMP_NUM_THREADS`` when the user or the job set it; None when unset, invalid, or exported by
    :func:`configure_threads` itself."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not (given.isdigit() and int(given) > 0) or os.environ.get(_CHOSEN_ENV) == given:
        return None
    return int(given)


def configure_threads(per_process: int | None = None) -> int:
    """Set the OpenMP/torch thread count from the allotment unless ``OMP_NUM_THREADS`` is set.

    ``per_process``: the threads each process may use (e.g. allotted cores // local processes);
    defaults to the whole allotment. The choice is exported so that child processes (DataLoader
    workers, scorer replicas, Ray actors started from here) inherit it. Returns the count in use.
    """
    threads = user_threads()
    if threads is None:
        threads = max(1, per_process or allotted_cpus())
        os.environ["OMP_NUM_THREADS"] = os.environ[_CHOSEN_ENV] = str(threads)
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
    """The one line shown for ``exc``: its message (an OSError keeps the path that it names; another
    library's exception type, passed to :func:`run` as a user error, is named before it)."""
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc.args):
        return f"{exc.strerror or exc}: {exc.filename}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if not isinstance(exc, (UserError, OSError)) and not text.startswith(type(exc).__name__):
        text = f"{type(exc).__name__}: {text}"
    return text


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
        for handler in logging.getLogger().handlers:  # what was logged comes before the error line
            handler.flush()
        fail(user_error_message(exc), prog)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    raise SystemExit(0 if status is None else int(status))
