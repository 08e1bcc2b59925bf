"""The one settings loader (noprop.settings): the same coercion and messages for noprop-train's TrainConfig, a
federation's FederationConfig from TOML, and Flower's run config."""

from __future__ import annotations

import pytest

from noprop.config import TrainConfig, build_config
from noprop.federation import FederationConfig
from noprop.ops.run_flags import FEDERATION_FLAGS
from noprop.settings import SettingsError, read_toml


def test_a_wrong_type_reads_the_same_for_every_settings_class(tmp_path):
    path = tmp_path / "run.toml"
    for key, value, message in (("seed", '"one"', "must be a whole number, not 'one'"),
                                ("lr", "true", "must be a number, not True"),
                                ("dataset", "3", "must be a string, not 3")):
        path.write_text(f"{key} = {value}\n")
        for cls, flags in ((TrainConfig, {}), (FederationConfig, FEDERATION_FLAGS)):
            with pytest.raises(SettingsError, match=f"config file {path}: key '{key}' {message}"):
                read_toml(path, cls, "settings", flags)


def test_toml_tables_lists_and_unknown_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nchannels = [4, 8, 8]\nepochs = 2.0\n")
    cfg = build_config(path, {})
    assert cfg.channels == (4, 8, 8) and cfg.epochs == 2 and isinstance(cfg.epochs, int)
    path.write_text("[federation]\nchannels = [4, 8, 8]\nrounds = 3\n")
    assert read_toml(path, FederationConfig, "federation", FEDERATION_FLAGS) == {"channels": "4,8,8",
                                                                                  "num_rounds": 3}
    path.write_text("epochz = 1\n")
    with pytest.raises(SettingsError, match="unknown key 'epochz'; known keys: method, dataset, data-root"):
        build_config(path, {})


def test_run_config_round_trip_coerces_by_declared_type():
    cfg = FederationConfig(num_rounds=7, lr=0.5, z_skip=False, channels="8,16,16")
    assert FederationConfig.from_run_config(cfg.to_run_config()) == cfg
    # Flower may hand back an int for a float field and an integral float for an int field
    back = FederationConfig.from_run_config({"lr": 1, "num-rounds": 3.0, "not-a-field": "x"})
    assert (back.lr, back.num_rounds) == (1.0, 3) and isinstance(back.lr, float) and isinstance(back.num_rounds, int)
    with pytest.raises(SettingsError, match="run config key 'num-rounds' must be a whole number, not 2.5"):
        FederationConfig.from_run_config({"num-rounds": 2.5})


def test_the_readout_is_dt_only_and_the_federation_reads_out_the_ensemble():
    assert FederationConfig().model_config((1, 8, 8), 4).readout == "ensemble"
    assert FederationConfig(readout="chain").model_config((1, 8, 8), 4).readout == "chain"
    # the backprop chain is one network trained end to end: it keeps its chain, as it has no z-skip
    assert FederationConfig(method="backprop").model_config((1, 8, 8), 4).readout == "chain"
    with pytest.raises(ValueError, match="unknown readout 'vote'"):
        FederationConfig(readout="vote").validate()
    assert TrainConfig().validate().model_config((1, 8, 8), 4).readout == "chain"  # noprop-train: the paper's
    assert TrainConfig(readout="ensemble").validate().model_config((1, 8, 8), 4).readout == "ensemble"
    with pytest.raises(SettingsError, match="readout='ensemble': applies to dt only"):
        TrainConfig(method="ct", readout="ensemble").validate()
