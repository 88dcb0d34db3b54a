"""Model names to local directories (rebase/models.py); gemma_hf_dir is covered by the slow tests."""

from __future__ import annotations

import json
import time

import pytest

from rebase.errors import RebaseError
from rebase.models import BUILTINS, canonical_model_name, resolve_model

MISSING_HF_ID = "rebase-tests/no-such-model-for-unit-tests"


def test_builtin_minilm_is_a_sentence_transformers_directory():
    path = resolve_model("builtin:minilm")
    assert path.is_dir()
    assert (path / "modules.json").is_file()
    assert isinstance(json.loads((path / "modules.json").read_text()), list)


def test_unknown_builtin_names_the_builtins():
    with pytest.raises(RebaseError) as error:
        resolve_model("builtin:bert")
    assert str(error.value) == (
        "unknown built-in model 'builtin:bert'; built-ins are: builtin:minilm, builtin:gemma3-270m"
    )
    assert list(BUILTINS) == ["builtin:minilm", "builtin:gemma3-270m"]


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-rebase-model"])
def test_path_like_name_that_does_not_exist_is_rejected(name):
    with pytest.raises(RebaseError) as error:
        resolve_model(name)
    assert str(error.value) == f"model '{name}' is not a model directory, a built-in or a Hugging Face id"


def test_existing_file_is_not_a_model(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x00")
    with pytest.raises(RebaseError, match="is not a model directory, a built-in or a Hugging Face id"):
        resolve_model(str(weights))


def test_name_that_is_not_an_hf_id_is_rejected():
    with pytest.raises(RebaseError, match="is not a model directory"):
        resolve_model("org/name/extra")


def test_directory_without_model_files_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(RebaseError) as error:
        resolve_model(str(tmp_path))
    assert str(error.value) == f"{tmp_path} is a directory but not a model (no config.json or modules.json)"


@pytest.mark.parametrize("marker", ["config.json", "modules.json"])
def test_directory_with_a_model_file_resolves_to_its_absolute_path(tmp_path, monkeypatch, marker):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / marker).write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == model.resolve()
    assert resolve_model("./my-model").is_absolute()


def test_uncached_hf_id_fails_fast_when_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(RebaseError) as error:
        resolve_model(MISSING_HF_ID)
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert message.startswith(f"model '{MISSING_HF_ID}' is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in message and "builtin:minilm" in message


def test_uncached_hf_id_fails_fast_without_a_route_to_the_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")  # restored afterwards; the code only sets a default
    started = time.monotonic()
    with pytest.raises(RebaseError) as error:
        resolve_model(MISSING_HF_ID)
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert message.startswith(f"model '{MISSING_HF_ID}' could not be fetched from the Hugging Face Hub (")
    assert "builtin:minilm" in message


def test_canonical_name_of_builtins_and_hf_ids_is_unchanged():
    assert canonical_model_name("builtin:minilm") == "builtin:minilm"
    assert canonical_model_name("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"


def test_canonical_name_of_a_local_directory_is_absolute(tmp_path, monkeypatch):
    (tmp_path / "models" / "mine").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    assert canonical_model_name("mine") == str(tmp_path.resolve() / "models" / "mine")
    assert canonical_model_name("./mine/") == str(tmp_path.resolve() / "models" / "mine")
    assert canonical_model_name("../models/mine") == str(tmp_path.resolve() / "models" / "mine")


def test_canonical_name_of_a_missing_path_is_unchanged(tmp_path):
    missing = str(tmp_path / "gone")
    assert canonical_model_name(missing) == missing
