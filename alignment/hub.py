"""Models and datasets by name, a local folder or a Hugging Face hub id: the one home of turning
"this needs the hub, and the hub is off or out of reach" into a one-line :class:`UserError`.

    tokenizer = hub.from_pretrained(AutoTokenizer, cfg.model_name, given_by="--model_name")
    hub.check_model(cfg.policy_model_path, "--policy_model_path")   # before starting engines
    with hub.loading(source, given_by="--source", what="dataset"):
        rows = datasets.load_dataset(source, split="train")

Loading itself stays with transformers, datasets and huggingface_hub (the loading-by-name code
users rely on); this module reads what went wrong and says it in one line that names the model,
where the name came from (``given_by``: the flag, or the config key) and what to do instead. Without
it, a cluster job with ``HF_HUB_OFFLINE=1`` ends in a 40-line traceback about ``huggingface.co``.

Bottom floor: imports only :mod:`alignment.cli` (the libraries are imported when used).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alignment.cli import UserError

T = TypeVar("T")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubError(UserError):
    """A model or dataset named by the user that cannot be loaded; the message says why and what
    replaces it."""


def hub_offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``, or transformers' ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(k, "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_like_path(name: str | Path) -> bool:
    """A name that can only be a local path: absolute, ``./``, ``~``, or more than one ``/`` (a hub id
    is ``name`` or ``owner/name``)."""
    text = str(name)
    return text.startswith((os.sep, ".", "~")) or text.count("/") > 1 or text.endswith("/")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _names(exc: BaseException) -> set[str]:
    return {type(e).__name__ for e in _chain(exc)}


def explain(name: str | Path, given_by: str, what: str, exc: BaseException) -> HubError:
    """The one-line error for ``exc``, raised while loading the ``what`` named ``name``."""
    where = f"{what} {str(name)!r} ({given_by})"
    if Path(name).expanduser().exists():
        return HubError(f"cannot load the {what} in {name} ({given_by}): {_first_line(exc)}")
    if looks_like_path(name):
        return HubError(f"{where}: no such folder (nor a hub name: those are 'name' or 'owner/name')")
    names = _names(exc)
    if "HFValidationError" in names:
        return HubError(f"{where} is neither a local folder nor a valid hub name: {_first_line(exc)}")
    local = "a local file or folder" if what == "dataset" else "a local folder"
    replace = f"pass {local} with {given_by}"
    download = f"hf download {'--repo-type dataset ' if what == 'dataset' else ''}{name}"
    if hub_offline():
        return HubError(
            f"{where} is not {local} nor in the Hugging Face cache, and the hub is switched off "
            f"(HF_HUB_OFFLINE=1): {replace}, or download it first where the hub is reachable ({download})"
        )
    if names & {"RepositoryNotFoundError", "GatedRepoError", "DatasetNotFoundError", "RevisionNotFoundError"}:
        return HubError(
            f"{where} is not on the Hugging Face hub, or it is gated or private (log in with hf auth login): "
            f"{replace}"
        )
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if names & {"ConnectionError", "ConnectError", "TimeoutException", "ConnectTimeout", "ReadTimeout"} or (
        "connect" in str(exc).lower() or "couldn't reach" in str(exc).lower()
    ):
        return HubError(
            f"{where} is not {local} nor in the Hugging Face cache, and the hub ({endpoint}) cannot be "
            f"reached: {replace}, or download it first where the hub is reachable ({download})"
        )
    return HubError(f"cannot load {where}: {_first_line(exc)}")


def _is_loading_error(exc: BaseException, name: str | Path) -> bool:
    # transformers, datasets and huggingface_hub report a missing or unreachable source as an OSError
    # (ConnectionError, FileNotFoundError, HfHubHTTPError, ...) and a malformed hub id as huggingface_hub's
    # HFValidationError, a ValueError; a local folder that holds no model ("Unrecognized model in ...")
    # is a ValueError of transformers
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, ValueError) and (
        type(exc).__module__.startswith("huggingface_hub") or Path(name).expanduser().exists()
    )


@contextmanager
def loading(name: str | Path, given_by: str, what: str = "model") -> Iterator[None]:
    """Load ``name`` inside this block: a failure to find or fetch it becomes a :class:`HubError`."""
    try:
        yield
    except HubError:
        raise
    except Exception as exc:
        if not _is_loading_error(exc, name):
            raise
        raise explain(name, given_by, what, exc) from exc


def from_pretrained(factory: Callable[..., T] | Any, name: str | Path, given_by: str, what: str = "model",
                    **kwargs: Any) -> T:  # fmt: skip
    """``factory.from_pretrained(name, **kwargs)`` (e.g. ``AutoTokenizer``) with errors as :func:`loading`."""
    with loading(name, given_by, what):
        return factory.from_pretrained(str(name), **kwargs)


def check_model(name: str | Path, given_by: str, what: str = "model") -> None:
    """Fail now, in one line, if the model ``name`` cannot be found (a local folder, the cache or the
    hub): reads only its ``config.json``, before engines, actors or a 7B load start."""
    from transformers import AutoConfig

    from_pretrained(AutoConfig, name, given_by, what)


def load_dataset(path: str, given_by: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(path, **kwargs)`` with errors as :func:`loading`."""
    import datasets

    with loading(path, given_by, "dataset"):
        return datasets.load_dataset(path, **kwargs)
