"""Config loading: the shipped examples, strict keys and types, secrets kept out of output."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sparseloco import OverlapConfig
from subnet import NodeConfigError, Secret, config_from_dict, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_example_configs_load_and_share_one_run():
    miner = load_config(EXAMPLES / "miner.toml")
    validator = load_config(EXAMPLES / "validator.toml")
    assert (miner.role, miner.hotkey, validator.role) == ("miner", "miner-0", "validator")
    assert miner.run == validator.run
    assert miner.run.model.n_embd == 32 and miner.window.blocks_per_window == 4
    assert validator.chain.stake == 1000.0 and validator.validator.weights_every == 2


def test_example_miner_s3_alternative_loads_when_uncommented():
    """The commented-out S3 lines of miner.toml are a working config, not a sketch."""
    text = (EXAMPLES / "miner.toml").read_text()
    section = text[text.index("\n[storage]") : text.index("\n[chain]")]
    s3 = "\n[storage]\n" + "\n".join(
        line.removeprefix("# ")
        for line in section.splitlines()
        if line.startswith("# ") and "=" in line
    )
    data = tomllib.loads(text.replace(section, s3 + "\n\n"))
    env = {"R2_WRITE_SECRET_ACCESS_KEY": "w-secret", "R2_READ_SECRET_ACCESS_KEY": "r-secret"}
    cfg = config_from_dict(data, environ=env)
    assert cfg.storage.kind == "s3" and cfg.storage.region == "auto"
    assert cfg.storage.secret_access_key.reveal() == "w-secret"
    assert cfg.storage.read_secret_access_key.reveal() == "r-secret"


def test_example_miner_bittensor_alternative_loads_when_uncommented():
    """Swapping miner.toml's [chain] for its commented-out lines gives a Bittensor config."""
    text = (EXAMPLES / "miner.toml").read_text()
    section = text[text.index("\n[chain]") : text.index("\n[exchange]")]
    netuid = next(line for line in section.splitlines() if line.startswith("netuid"))
    commented = [
        line.removeprefix("# ").split("  #")[0]
        for line in section.splitlines()
        if line.startswith("# ") and "=" in line
    ]
    chain = "\n[chain]\n" + "\n".join([netuid, *commented]) + "\n"
    cfg = config_from_dict(tomllib.loads(text.replace(section, chain)))
    assert (cfg.chain.kind, cfg.chain.network, cfg.chain.netuid) == ("bittensor", "finney", 1)
    assert (cfg.chain.wallet_name, cfg.chain.wallet_path) == ("default", "~/.bittensor/wallets")


def _minimal(**sections):
    return {"role": "miner", "hotkey": "m", **sections}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_minimal(colour="red"), "unknown key colour"),
        (_minimal(run={"inner_step": 3}), "unknown key run.inner_step"),
        (_minimal(run={"inner_steps": "3"}), "run.inner_steps must be an integer"),
        (_minimal(run={"inner_steps": True}), "run.inner_steps must be an integer"),
        (_minimal(run={"preset": "nope"}), "run.preset 'nope' is unknown"),
        (_minimal(run={"model": {"n_embd": 30, "n_head": 4}}), "run.model: n_embd=30"),
        (_minimal(storage={"kind": "ftp"}), "storage.kind must be one of"),
        (_minimal(storage={"kind": "s3"}), "storage.bucket must name a bucket"),
        (_minimal(window={"blocks_per_window": 0}), "window.blocks_per_window must be >= 1"),
        (_minimal(hotkey="a/b"), "hotkey 'a/b' must be"),
        ({"hotkey": "m"}, "missing 1 required positional argument: 'role'"),
        (_minimal(storage="s3"), "storage must be a table"),
        (_minimal(miner={"overlap": 1}), "miner.overlap must be true or false"),
        (_minimal(miner={"apply_after": 2}), "miner.apply_after needs miner.overlap"),
        (
            _minimal(miner={"overlap": True, "apply_after": 10}),
            "miner.apply_after must be < run.inner_steps",
        ),
        (
            _minimal(miner={"overlap": True, "overlap_own_weight": 1.5}),
            "miner.overlap_own_weight must lie in .0, 1.",
        ),
        (
            _minimal(miner={"overlap": True, "overlap_message_weight": -0.5}),
            "miner.overlap_message_weight must lie in .0, 1.",
        ),
        (
            _minimal(miner={"overlap_extrapolation": "0.5"}),
            "miner.overlap_extrapolation must be a number",
        ),
        (
            _minimal(miner={"overlap": True, "apply_wait": False}),
            "miner.apply_wait = false needs miner.apply_after >= 1",
        ),
        (
            _minimal(miner={"overlap_own_weight": 1.0}),
            "miner.overlap_own_weight needs miner.overlap = true",
        ),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(NodeConfigError, match=message.replace("(", r"\(")):
        config_from_dict(data, environ={})


def test_secrets_from_env_never_printed():
    storage = {
        "kind": "s3",
        "bucket": "b",
        "access_key_id": "AKIDWRITE",
        "secret_access_key_env": "WRITE_SECRET",
        "read_access_key_id": "AKIDREAD",
        "read_secret_access_key": "read-secret-value",
    }
    cfg = config_from_dict(
        _minimal(storage=storage), environ={"WRITE_SECRET": "write-secret-value"}
    )
    assert cfg.storage.secret_access_key == Secret("write-secret-value")
    assert cfg.storage.secret_access_key.reveal() == "write-secret-value"
    shown = repr(cfg) + str(cfg) + str(cfg.to_dict())
    assert "write-secret-value" not in shown and "read-secret-value" not in shown
    assert cfg.to_dict()["storage"]["secret_access_key"] == "***"


def test_secret_env_must_exist_and_not_duplicate():
    storage = {"kind": "s3", "bucket": "b", "access_key_id": "k", "secret_access_key_env": "NOPE"}
    with pytest.raises(NodeConfigError, match="'NOPE', which is not set"):
        config_from_dict(_minimal(storage=storage), environ={})
    storage = {**storage, "secret_access_key": "x"}
    with pytest.raises(NodeConfigError, match="given twice"):
        config_from_dict(_minimal(storage=storage), environ={"NOPE": "y"})
    with pytest.raises(NodeConfigError, match=r"unknown key storage\.bucket_env"):
        config_from_dict(_minimal(storage={"bucket_env": "X"}), environ={"X": "b"})


def test_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(NodeConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("role = \n")
    with pytest.raises(NodeConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")


def test_bittensor_chain_needs_no_hotkey():
    cfg = config_from_dict(
        {"role": "validator", "chain": {"kind": "bittensor", "netuid": 3, "wallet_name": "w"}}
    )
    assert (cfg.chain.kind, cfg.chain.netuid, cfg.chain.wallet_name) == ("bittensor", 3, "w")


def test_the_overlap_start_rule_reaches_the_optimizer_settings():
    cfg = config_from_dict(
        _minimal(
            miner={
                "overlap": True,
                "overlap_extrapolation": 0.25,
                "overlap_own_weight": 1,
                "overlap_message_weight": 0,
            }
        ),
        environ={},
    )
    assert cfg.miner.overlap_config() == OverlapConfig(0.25, 1.0, 0.0)
    assert config_from_dict(_minimal(), environ={}).miner.overlap_config() is False
