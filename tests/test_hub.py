"""alignment/hub.py: a model or dataset that needs the hub, offline or out of reach, is one line naming
it and the flag that replaces it; local folders load as before."""

from __future__ import annotations

import socket

import httpx
import pytest
from transformers import AutoConfig, AutoTokenizer

from alignment import hub
from alignment.cli import UserError


def test_local_folder_loads(toy_models):
    tokenizer = hub.from_pretrained(AutoTokenizer, toy_models / "policy", "--model_name")
    assert tokenizer("hello")["input_ids"]
    hub.check_model(toy_models / "policy", "--model_name")  # no error


@pytest.mark.parametrize(
    ("name", "says"),
    [
        # offline (the tests run with HF_HUB_OFFLINE=1) and not cached
        ("no-org/no-model", "model 'no-org/no-model' (--policy_model_path) is not a local folder nor in the Hugging "
         "Face cache, and the hub is switched off (HF_HUB_OFFLINE=1): pass a local folder with --policy_model_path"),
        ("models/toy/nope", "model 'models/toy/nope' (--policy_model_path): no such folder"),  # a path, not an id
        ("./policy", "model './policy' (--policy_model_path): no such folder"),
        ("a b", "model 'a b' (--policy_model_path) is neither a local folder nor a valid hub name"),
    ],
)  # fmt: skip
def test_names_that_cannot_load_are_one_line(name, says, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        hub.check_model(name, "--policy_model_path")
    assert str(err.value).startswith(says) and "\n" not in str(err.value)


def test_local_folder_that_is_no_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(
        UserError, match=rf"cannot load the model in {tmp_path} \(--model_name\): .*config\.json"
    ):
        hub.check_model(tmp_path, "--model_name")


def test_dataset_offline_names_the_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UserError,
        match=r"dataset 'no-org/no-data' \(--prompts\) is not a local file or folder .*"
        r"HF_HUB_OFFLINE=1.*hf download --repo-type dataset no-org/no-data",
    ):
        hub.load_dataset("no-org/no-data", "--prompts", split="train")


def test_unreachable_hub_is_named_as_such(monkeypatch):
    """Online but out of reach. transformers wraps the connection failure in an OSError ("We couldn't
    connect to ..."); the real failure is taken from a closed local port (the real hub retries for
    ~25 s before giving up, too slow for a unit test)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        httpx.get(f"http://127.0.0.1:{port}/org/model/resolve/main/config.json")
    except httpx.ConnectError as exc:
        cause = exc
    wrapped = OSError("We couldn't connect to 'http://127.0.0.1:9' to load the files")
    wrapped.__cause__ = cause
    message = str(hub.explain("org/model", "--model_name", "model", wrapped))
    assert message.startswith(
        "model 'org/model' (--model_name) is not a local folder nor in the Hugging Face"
    )
    assert "the hub (http://127.0.0.1:9) cannot be reached: pass a local folder with --model_name" in message


def test_other_errors_are_not_dressed_up(toy_models):
    with pytest.raises(TypeError), hub.loading(toy_models / "policy", "--model_name"):
        AutoConfig.from_pretrained(str(toy_models / "policy"), not_a_kwarg=object()).to_dict(1)
