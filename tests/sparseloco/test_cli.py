import json

import pytest

from sparseloco.cli import main
from sparseloco.models import GPTConfig


def test_model_config_file_is_validated(tmp_path, capsys):
    bad = tmp_path / "model.json"
    bad.write_text(json.dumps({**GPTConfig().to_dict(), "bogus": 1}))
    assert main(["simulate", "--model-config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "unknown GPTConfig fields: ['bogus']" in capsys.readouterr().err


def test_gpt_config_round_trips_through_json():
    cfg = GPTConfig(n_layer=3, n_kv_head=2, pos="rope", norm="rmsnorm")
    assert GPTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_deployment_roles_are_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["miner", "--help"])
    assert info.value.code == 0
    assert "--config" in capsys.readouterr().out
