"""Config validation: every invalid value is a one-line ConfigError naming the key."""
from pathlib import Path

import pytest

from florist_mpi import methods
from florist_mpi.config import ConfigError, config_from_tree, load_config, parse_config_text, resume_mismatch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.federation.method in methods.names()


def test_defaults_and_alpha_per_rank():
    cfg = config_from_tree({"federation": {"num_clients": 3}, "lora": {"ranks": [8, 4, 2], "alpha": "2r"}})
    assert [cfg.lora.alpha_of(c) for c in range(3)] == [16.0, 8.0, 4.0]
    assert [cfg.lora.scaling_of(c) for c in range(3)] == [2.0, 2.0, 2.0]
    assert cfg.federation.participants_per_round() == 3


def test_fraction_of_clients_per_round():
    cfg = config_from_tree({"federation": {"num_clients": 10, "clients_per_round": 0.25}})
    assert cfg.federation.participants_per_round() == 3


def test_overrides_apply_with_yaml_types():
    cfg = config_from_tree({}, ["federation.tau=0.75", "lora.ranks=[4, 4, 2, 2, 1, 1, 1, 1]", "run.output=x.h5"])
    assert cfg.federation.tau == 0.75 and cfg.lora.ranks[-1] == 1 and cfg.run.output == "x.h5"


def test_local_epochs_replace_steps():
    cfg = config_from_tree({"train": {"local_epochs": 2}})
    assert cfg.train.local_steps is None and cfg.train.local_epochs == 2


@pytest.mark.parametrize("value, expected", [(1.0, 10), (0.5, 5), (0.25, 3), (1, 1), (4, 4), (4.0, 4), (None, 10)])
def test_clients_per_round_floats_are_fractions_and_integers_counts(value, expected):
    cfg = config_from_tree({"federation": {"num_clients": 10, "clients_per_round": value}})
    assert cfg.federation.participants_per_round() == expected


def test_local_work_budgets_in_microbatches_are_whole_optimizer_steps():
    from florist_mpi.training import num_local_batches

    cfg = config_from_tree({"train": {"local_epochs": 1, "micro_batch_size": 4, "gradient_accumulation_steps": 8}})
    # 395 examples: 99 micro-batches for one epoch, rounded up to 13 whole steps of 8
    assert num_local_batches(cfg.train, 395) == 104
    assert num_local_batches(cfg.train, 32) == 8
    steps = config_from_tree({"train": {"local_steps": 5, "gradient_accumulation_steps": 3}})
    assert num_local_batches(steps.train, 1000) == 15


@pytest.mark.parametrize(
    "tree, overrides, key",
    [
        ({"federation": {"tau": 0}}, [], "federation.tau"),
        ({"federation": {"tau": 1.5}}, [], "federation.tau"),
        ({"federation": {"method": "fedavg"}}, [], "federation.method"),
        ({"federation": {"num_clients": 0}}, [], "federation.num_clients"),
        ({"federation": {"clients_per_round": 1.5}}, [], "federation.clients_per_round"),
        ({"federation": {"num_clients": 2, "clients_per_round": 3}}, [], "clients_per_round"),
        ({"lora": {"rank": 0}}, [], "lora.rank"),
        ({"lora": {"ranks": [4, 4]}}, [], "lora.ranks"),
        ({"lora": {"alpha": "two"}}, [], "lora.alpha"),
        ({"lora": {"target_modules": []}}, [], "lora.target_modules"),
        ({"run": {"rounds": -1}}, [], "run.rounds"),
        ({"run": {"roundz": 3}}, [], "run.roundz"),
        ({"train": {"zero_stage": 3}}, [], "train.zero_stage"),
        ({"data": {"source": "json"}}, [], "data.path"),
        ({"eval": {"kind": "mmlu"}}, [], "eval.path"),
        ({}, ["federation.tau=abc"], "federation.tau"),
        ({"federation": {"clients_per_round": True}}, [], "federation.clients_per_round"),
        ({"federation": {"clients_per_round": 0}}, [], "federation.clients_per_round"),
        ({"train": {"local_steps": None}}, [], "train.local_steps"),
        ({"train": {"local_steps": 5, "local_epochs": 1}}, [], "train.local_epochs"),
    ],
)
def test_invalid_values_name_the_key(tree, overrides, key):
    with pytest.raises(ConfigError) as info:
        config_from_tree(tree, overrides)
    message = str(info.value)
    assert key in message and "\n" not in message


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        config_from_tree({}, ["federation.tau"])


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="YAML mapping"):
        parse_config_text("- a\n- b\n")


def test_yaml_is_loaded_safely():
    with pytest.raises(ConfigError):
        parse_config_text("run: !!python/object/apply:os.system ['true']\n")


def test_round_trip_through_yaml():
    cfg = config_from_tree({"lora": {"alpha": "2r"}, "train": {"local_epochs": 1}})
    assert parse_config_text(cfg.to_yaml()) == cfg


def test_resume_mismatch_names_the_first_differing_key():
    base = config_from_tree({})
    assert resume_mismatch(base, config_from_tree({"run": {"rounds": 9}})) is None
    assert resume_mismatch(base, config_from_tree({"federation": {"method": "fedit"}})) == "federation.method"
    assert resume_mismatch(base, config_from_tree({"lora": {"rank": 4}})) == "lora.rank"
    assert resume_mismatch(base, config_from_tree({"data": {"max_length": 32}})) == "data.max_length"


def test_client_engines_may_change_on_resume_but_other_train_keys_may_not():
    base = config_from_tree({"train": {"client_engines": "reuse"}})
    assert resume_mismatch(base, config_from_tree({"train": {"client_engines": "fresh"}})) is None
    assert resume_mismatch(base, config_from_tree({"train": {"client_engines": "auto", "lr": 0.5}})) == "train.lr"


def test_a_target_module_that_is_not_linear_is_refused_in_one_line(tmp_path, capsys):
    from florist_mpi.cli import main

    config = tmp_path / "embed.yaml"
    config.write_text("lora:\n  target_modules: [q_proj, embed_tokens]\n")
    assert main(["validate", str(config), "--no-data"]) == 0  # the config alone is fine
    capsys.readouterr()
    assert main(["validate", str(config)]) == 2  # the model has no linear embed_tokens
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'embed_tokens' matches 'model.embed_tokens' (Embedding)" in err and "remove it" in err


def test_resume_keys_include_what_the_logged_metric_means():
    base = config_from_tree({})
    assert resume_mismatch(base, config_from_tree({"eval": {"max_examples": 8}})) == "eval.max_examples"
    assert resume_mismatch(base, config_from_tree({"eval": {"every": 2, "batch_size": 4}})) is None


def test_precision_needs_the_matching_model_dtype_for_a_new_run_but_logs_stay_readable():
    from florist_mpi.errors import UserError
    from florist_mpi.preflight import check_run_settings

    mismatched = config_from_tree({"train": {"precision": "bf16"}})  # a logged config may hold this
    with pytest.raises(UserError, match="train.precision 'bf16'.*model.dtype: bfloat16"):
        check_run_settings(mismatched)
    check_run_settings(config_from_tree({"train": {"precision": "bf16"}, "model": {"dtype": "bfloat16"}}))


def test_configuration_doc_is_generated_from_the_models():
    from florist_mpi import configdoc
    from florist_mpi.config import ExperimentConfig

    # every key of every section has its meaning where it is defined
    for section in ExperimentConfig.model_fields:
        for key, _, meaning in configdoc.rows(configdoc.section_model(section)):
            assert meaning, f"{section}.{key} has no Field(description=...)"
    # the committed doc's tables are exactly what the models generate
    assert configdoc.main(["--check"]) == 0, "run: python -m florist_mpi.configdoc"


def test_configuration_doc_check_sees_a_stale_table(tmp_path):
    from florist_mpi import configdoc

    doc = tmp_path / "configuration.md"
    doc.write_text(configdoc.DOC.read_text().replace("| federated rounds |", "| rounds to run |"))
    assert configdoc.main(["--check", "--doc", str(doc)]) == 1
    assert configdoc.main(["--doc", str(doc)]) == 0 and doc.read_text() == configdoc.DOC.read_text()
    doc.write_text(configdoc.DOC.read_text().replace("<!-- config:log -->", ""))
    with pytest.raises(ValueError, match="log"):
        configdoc.main(["--check", "--doc", str(doc)])
