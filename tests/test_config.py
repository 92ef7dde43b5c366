"""The run config: round-trips, strict keys, --set parsing, presets, layering."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from shopee_tpu.config import (
    PRESETS,
    AugmentConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    PredictConfig,
    RunConfig,
    config_diff,
)


def _changed() -> RunConfig:
    """A config that differs from the defaults in every kind of field."""
    return RunConfig.preset("demo").override(
        "data.train=/data/train-*.tfrec",
        "data.image_size=none",
        "optim.step_values=1e-3,2e-4,4e-5",
        "predict.tta=identity,flip_lr,shift_2",
        "augment.mixup=0.2",
        "epochs=3",
        "mixed_precision=yes",
    )


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip_through_a_file(tmp_path, suffix):
    cfg = _changed()
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        cfg.save(path)
    else:
        path.write_text(yaml.safe_dump(cfg.to_dict()))

    loaded = RunConfig.load(path)

    assert loaded == cfg
    assert loaded.optim.step_values == (1e-3, 2e-4, 4e-5)  # tuples come back
    assert isinstance(loaded.predict.tta, tuple)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_a_file_may_hold_only_differences_and_name_its_preset(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("preset: shopee-b3\nepochs: 4\noptim:\n  learning_rate: 1.0e-4\n")

    cfg = RunConfig.load(path)

    assert cfg == PRESETS["shopee-b3"].override("epochs=4", "optim.learning_rate=1e-4")
    assert config_diff(PRESETS["shopee-b3"], cfg) == [
        "epochs: 15 -> 4",
        "optim.learning_rate: 5e-05 -> 0.0001",
    ]


@pytest.mark.parametrize(
    "values, key",
    [
        ({"epoch": 3}, "epoch"),
        ({"optim": {"learning_rat": 0.1}}, "optim.learning_rat"),
        ({"data": {"train": "x", "size": 3}}, "data.size"),
    ],
)
def test_unknown_keys_are_rejected_with_the_key_named(tmp_path, values, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig().merge(values)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_dict(values)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError) as err:
        RunConfig.load(path)
    assert key in str(err.value) and "bad.json" in str(err.value)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig().override(f"{key}=1")


def test_wrong_value_types_are_rejected_with_the_key_named(tmp_path):
    with pytest.raises(ConfigError, match="epochs"):
        RunConfig().override("epochs=three")
    with pytest.raises(ConfigError, match="augment.flip_lr"):
        RunConfig().override("augment.flip_lr=maybe")
    with pytest.raises(ConfigError, match="epochs"):
        RunConfig().override("epochs=none")  # not an optional field
    with pytest.raises(ConfigError, match="data"):
        RunConfig().merge({"data": 5})
    with pytest.raises(ConfigError, match="key=value"):
        RunConfig().override("epochs")
    broken = tmp_path / "broken.json"
    broken.write_text('{"epochs": 3,')
    with pytest.raises(ConfigError, match="broken.json"):
        RunConfig.load(broken)


def test_set_parses_values_by_the_field_type():
    cfg = RunConfig().override(
        "epochs=7",
        "optim.learning_rate=3e-4",
        "optim.weight_decay=0",
        "augment.flip_ud=true",
        "augment.flip_lr=0",
        "data.cache=YES",
        "model.weights=none",
        "data.valid=/v",
        "steps_per_epoch=50",
        "optim.step_epochs=4, 8",
        "predict.tta=identity, flip_lr",
        "name = spaced",
    )

    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)
    assert cfg.optim.learning_rate == 3e-4
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert (cfg.augment.flip_ud, cfg.augment.flip_lr, cfg.data.cache) == (
        True,
        False,
        True,
    )
    assert cfg.model.weights is None and cfg.data.valid == "/v"
    assert cfg.steps_per_epoch == 50
    assert cfg.optim.step_epochs == (4, 8)
    assert cfg.predict.tta == ("identity", "flip_lr")
    assert cfg.name == "spaced"
    # Optional fields clear with none/null/empty; later assignments win.
    again = cfg.override(["steps_per_epoch=null", "data.valid=", "epochs=2"])
    assert (again.steps_per_epoch, again.data.valid, again.epochs) == (None, None, 2)
    # Values may contain '=' (only the first one splits).
    assert RunConfig().override("data.train=gs://b/x=1").data.train == "gs://b/x=1"


def test_presets_exist_and_are_frozen():
    names = {"demo", "cdiscount"} | {f"shopee-b{n}" for n in range(8)}
    assert names <= set(PRESETS)
    for name in names:
        cfg = RunConfig.preset(name)
        assert cfg.name == name
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
    sizes = [PRESETS[f"shopee-b{n}"].data.image_size for n in range(8)]
    assert sizes == sorted(sizes) and sizes[0] == 224
    assert PRESETS["shopee-b7"].model.backbone == "efficientnet-b7"

    cfg = RunConfig.preset("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.learning_rate = 1.0
    with pytest.raises(TypeError):
        PRESETS["demo"] = RunConfig()  # the registry itself is read-only
    changed = cfg.override("epochs=1")
    assert RunConfig.preset("demo").epochs == 22 and changed.epochs == 1
    with pytest.raises(ConfigError, match="shopee-b0"):  # lists the known names
        RunConfig.preset("shopee-b9")


def test_resolve_applies_preset_then_file_then_set(tmp_path):
    path = tmp_path / "diff.yaml"
    path.write_text("epochs: 5\nbatch_size: 8\ndata:\n  train: /from-file\n")

    cfg = RunConfig.resolve("demo", path, ["epochs=6"])

    assert cfg.epochs == 6  # --set beats the file
    assert cfg.batch_size == 8  # the file beats the preset
    assert cfg.data.train == "/from-file"
    assert cfg.model == PRESETS["demo"].model  # the rest is the preset
    assert RunConfig.resolve() == RunConfig()
    assert RunConfig.resolve(sets=["epochs=2"]).epochs == 2


def test_a_file_naming_another_preset_than_the_command_line_is_an_error(tmp_path):
    path = tmp_path / "b3.yaml"
    path.write_text("preset: shopee-b3\nepochs: 4\n")
    with pytest.raises(ConfigError, match="shopee-b3"):
        RunConfig.resolve("demo", path)
    assert RunConfig.resolve("shopee-b3", path).epochs == 4  # agreeing is fine


def test_config_diff_lists_changed_dotted_keys():
    a = RunConfig.preset("demo").override("epochs=8", "optim.learning_rate=0.003")
    b = a.override("epochs=2", "optim.learning_rate=0.01", "out_dir=/elsewhere")

    assert config_diff(a, a) == []
    assert config_diff(a, b) == [
        "epochs: 8 -> 2",
        "optim.learning_rate: 0.003 -> 0.01",
        "out_dir: 'runs/demo' -> '/elsewhere'",
    ]
    assert config_diff(a, b, ignore=["out_dir"]) == config_diff(a, b)[:2]


def test_sections_build_from_dicts_and_replace():
    assert DataConfig.from_dict({"train": "/t"}).train == "/t"
    assert ModelConfig().replace(dropout=0.3).dropout == 0.3
    assert AugmentConfig.from_dict({"rotate": 15}).rotate == 15.0
    assert OptimConfig.from_dict({"step_epochs": [3, 6]}).step_epochs == (3, 6)
    assert PredictConfig.from_dict({"batch_size": None}).batch_size is None
    with pytest.raises(ConfigError, match="model.depth"):
        ModelConfig.from_dict({"depth": 3}, where="model")
