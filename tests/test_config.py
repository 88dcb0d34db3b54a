"""Stage configs (rebase/config.py): YAML loading, overrides and errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from rebase.config import DatastoreConfig, build_config, load_config
from rebase.errors import RebaseError

GOOD_YAML = """\
sources:
  - files:data/reviews.csv
  - bigbench:arithmetic
out: stores/demo
rows_per_dataset: 50
max_value_chars: 200
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "datastore.yaml"
    path.write_text(text)
    return path


def load_error(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(RebaseError) as error:
        load_config(DatastoreConfig, path, overrides)
    return str(error.value)


def test_load_config_reads_yaml_values(tmp_path):
    config = load_config(DatastoreConfig, write_config(tmp_path, GOOD_YAML))
    assert config.sources == ["files:data/reviews.csv", "bigbench:arithmetic"]
    assert config.out == Path("stores/demo")
    assert config.rows_per_dataset == 50
    assert config.max_value_chars == 200
    assert config.description is None


def test_embed_concurrency_list_in_yaml_becomes_a_tuple(tmp_path):
    config = load_config(DatastoreConfig, write_config(tmp_path, GOOD_YAML + "embed_concurrency: [1, 3]\n"))
    assert config.embed_concurrency == (1, 3)


def test_unknown_field_names_the_file_and_the_field(tmp_path):
    path = write_config(tmp_path, GOOD_YAML + "rows_per_datset: 10\n")
    assert load_error(path) == f"{path}: field 'rows_per_datset': Extra inputs are not permitted"


def test_wrong_type_names_the_file_and_the_field(tmp_path):
    path = write_config(tmp_path, GOOD_YAML.replace("rows_per_dataset: 50", "rows_per_dataset: many"))
    message = load_error(path)
    assert message.startswith(f"{path}: field 'rows_per_dataset': ")
    assert "integer" in message


def test_value_below_the_minimum_names_the_field(tmp_path):
    path = write_config(tmp_path, GOOD_YAML.replace("max_value_chars: 200", "max_value_chars: 8"))
    message = load_error(path)
    assert message.startswith(f"{path}: field 'max_value_chars': ")
    assert "16" in message


@pytest.mark.parametrize("bounds", ["[3, 1]", "[0, 2]"])
def test_bad_embed_concurrency_names_the_field_and_the_rule(tmp_path, bounds):
    path = write_config(tmp_path, GOOD_YAML + f"embed_concurrency: {bounds}\n")
    message = load_error(path)
    assert message.startswith(f"{path}: field 'embed_concurrency': ")
    assert "must be (min, max) with 1 <= min <= max" in message


def test_missing_required_field_names_it(tmp_path):
    path = write_config(tmp_path, "sources: [files:a.csv]\n")
    assert load_error(path) == f"{path}: field 'out': Field required"


def test_empty_file_reports_the_first_missing_field(tmp_path):
    path = write_config(tmp_path, "")
    assert load_error(path) == f"{path}: field 'sources': Field required"


def test_blank_source_spec_is_rejected(tmp_path):
    path = write_config(tmp_path, "sources: [files:a.csv, '  ']\nout: o\n")
    message = load_error(path)
    assert message.startswith(f"{path}: ")
    assert "a source spec is empty" in message


def test_invalid_yaml_names_the_file_and_the_line(tmp_path):
    # Line 4 is indented under a scalar value: PyYAML's error points at it.
    path = write_config(tmp_path, "sources:\n  - files:a.csv\nout: o\n  bad: 1\n")
    assert load_error(path) == f"{path}: not valid YAML at line 4"


def test_tab_indentation_names_its_line(tmp_path):
    path = write_config(tmp_path, "sources: [files:a.csv]\nout: o\n\tx: 1\n")
    assert load_error(path) == f"{path}: not valid YAML at line 3"


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    path = write_config(tmp_path, "- files:a.csv\n- files:b.csv\n")
    assert load_error(path) == f"{path}: expected a mapping of fields at the top level"


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.yaml"
    assert load_error(path) == f"config file not found: {path}"


def test_a_directory_is_not_a_config_file(tmp_path):
    assert load_error(tmp_path) == f"config file not found: {tmp_path}"


def test_overrides_win_over_yaml_values_and_none_is_ignored(tmp_path):
    path = write_config(tmp_path, GOOD_YAML)
    overrides = {"rows_per_dataset": 7, "sources": ["files:other.jsonl"], "max_value_chars": None, "embedder": None}
    config = load_config(DatastoreConfig, path, overrides)
    assert config.rows_per_dataset == 7
    assert config.sources == ["files:other.jsonl"]
    assert config.max_value_chars == 200  # from the YAML: None means "flag not given"
    assert config.out == Path("stores/demo")


def test_override_can_set_a_field_the_yaml_leaves_out(tmp_path):
    path = write_config(tmp_path, "sources: [files:a.csv]\n")
    config = load_config(DatastoreConfig, path, {"out": Path("elsewhere")})
    assert config.out == Path("elsewhere")


def test_bad_override_is_not_blamed_on_the_file(tmp_path):
    path = write_config(tmp_path, GOOD_YAML)
    message = load_error(path, {"rows_per_dataset": 0})
    assert "field 'rows_per_dataset'" in message
    assert "command line" in message


def test_build_config_validates_plain_values():
    config = build_config(DatastoreConfig, {"sources": ["bigbench"], "out": "out", "index": "flat"})
    assert (config.sources, config.out, config.index) == (["bigbench"], Path("out"), "flat")


def test_build_config_errors_come_from_the_command_line():
    with pytest.raises(RebaseError) as error:
        build_config(DatastoreConfig, {"sources": ["bigbench"]})
    assert str(error.value) == "command line: field 'out': Field required"


def test_build_config_names_the_given_origin_and_the_literal_choices():
    with pytest.raises(RebaseError) as error:
        build_config(DatastoreConfig, {"sources": ["bigbench"], "out": "o", "index": "tree"}, origin="job.yaml")
    message = str(error.value)
    assert message.startswith("job.yaml: field 'index': ")
    assert "'auto', 'flat', 'ivf' or 'hnsw'" in message


def test_empty_sources_list_is_rejected():
    with pytest.raises(RebaseError, match=r"^command line: field 'sources': List should have at least 1 item"):
        build_config(DatastoreConfig, {"sources": [], "out": "o"})


def test_learning_rate_default_depends_on_the_method_and_is_not_stored():
    from rebase.config import FULL_LEARNING_RATE, LORA_LEARNING_RATE, TrainConfig

    lora = TrainConfig(data="d", task="t.yaml", out="o")
    full = lora.model_copy(update={"full": True})
    assert (LORA_LEARNING_RATE, FULL_LEARNING_RATE) == (2e-4, 2e-5)
    assert (lora.effective_learning_rate, full.effective_learning_rate) == (2e-4, 2e-5)
    assert TrainConfig(data="d", task="t.yaml", out="o", full=True, learning_rate=0.01).effective_learning_rate == 0.01
    # students' stats.json and fingerprints hold the config as given: None, not the derived value
    assert lora.model_dump(mode="json")["learning_rate"] is None


def test_checkpoints_go_under_the_student_unless_a_storage_path_is_given(tmp_path):
    from rebase.config import TrainConfig

    config = TrainConfig(data="d", task="t.yaml", out=tmp_path / "student")
    assert config.checkpoint_storage == str(tmp_path / "student" / "checkpoints")
    assert config.model_copy(update={"storage_path": "s3://bucket/x"}).checkpoint_storage == "s3://bucket/x"
    assert config.model_dump()["storage_path"] is None
