import json
import os
import socket
import subprocess
import sys

import pytest

from gauntlet import SqliteSubnet
from sparseloco import __version__
from sparseloco.models import GPTConfig
from subnet.cli import main


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


def test_a_role_stops_after_windows_or_at_a_window_not_both(capsys):
    with pytest.raises(SystemExit) as info:
        main(["miner", "--config", "m.toml", "--windows", "2", "--until-window", "5"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def _cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    """``python -m subnet.cli ARGS`` in a real process, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "subnet.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=120,
    )


def _one_error_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0]


def test_help_lists_every_subcommand_and_version():
    top = _cli("--help")
    assert top.returncode == 0
    for name in ("simulate", "miner", "validator", "demo"):
        assert f"    {name}" in top.stdout
    assert "``" not in top.stdout and ":mod:" not in top.stdout
    assert _cli("--version").stdout.strip() == f"sparseloco {__version__}"


@pytest.mark.parametrize("command", ["simulate", "miner", "validator", "demo"])
def test_subcommand_help_names_the_command_and_every_option(command):
    proc = _cli(command, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: sparseloco {command}")
    options = proc.stdout[proc.stdout.index("options:") :].splitlines()[1:]
    # every option line is followed (on it or the next line) by a description
    flags = [line for line in options if line.lstrip().startswith("-")]
    assert flags
    for line in flags:
        after = line.strip().split("  ", 1)
        following = options[options.index(line) + 1].strip() if line != options[-1] else ""
        assert len(after) == 2 or (following and not following.startswith("-")), line


def test_binary_data_is_refused_and_no_run_folder_is_left(tmp_path):
    binary = tmp_path / "prog"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    out = tmp_path / "run"
    _one_error_line(_cli("simulate", "--data", str(binary), "--out", str(out)), "neither text")
    assert not out.exists()


def test_missing_data_and_unwritable_out(tmp_path):
    out = tmp_path / "run"
    _one_error_line(_cli("simulate", "--data", str(tmp_path / "nope"), "--out", str(out)), "nope")
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_error_line(_cli("simulate", "--out", str(blocker / "run")), "--out")


def test_missing_s3_credentials(tmp_path):
    env = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
    }
    out = tmp_path / "run"
    proc = _cli("simulate", "--storage", "s3://bucket/p", "--out", str(out), env=env)
    _one_error_line(proc, "S3 credentials")
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('role = "miner\n', "not valid TOML"),
        ('role = "miner"\nhotkey = 3\n', "hotkey must be a string"),
        ('role = "miner"\nhotkey = "a"\nbogus = 1\n', "unknown key bogus"),
        ('role = "miner"\nhotkey = "a"\n[window]\nblocks_per_window = 0\n', "blocks_per_window"),
    ],
)
def test_bad_node_configs_are_one_line(tmp_path, text, needle):
    cfg = tmp_path / "miner.toml"
    cfg.write_text(text)
    _one_error_line(_cli("miner", "--config", str(cfg)), needle)


def test_missing_and_unreadable_node_configs(tmp_path):
    _one_error_line(_cli("validator", "--config", str(tmp_path / "x.toml")), "does not exist")
    _one_error_line(_cli("miner", "--config", str(tmp_path)), "cannot read config file")
    _one_error_line(
        _cli("demo", "--miner-config", "a.toml", "--validator-config", "b.toml", cwd=tmp_path),
        "does not exist",
    )


def test_a_chain_file_of_another_subnet_is_refused(tmp_path):
    chain = tmp_path / "chain.sqlite"
    SqliteSubnet(chain, netuid=99).close()
    cfg = tmp_path / "miner.toml"
    cfg.write_text(f'role = "miner"\nhotkey = "a"\nstate_dir = "{tmp_path / "state"}"\n')
    _one_error_line(_cli("miner", "--config", str(cfg), "--chain", str(chain)), "netuid")


def _closed_port_url() -> str:
    """A loopback websocket URL nothing listens on (never a real network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{s.getsockname()[1]}"


def _bittensor_miner(tmp_path, wallet_path) -> str:
    cfg = tmp_path / "miner.toml"
    cfg.write_text(
        f'role = "miner"\nstate_dir = "{tmp_path / "state"}"\n[chain]\nkind = "bittensor"\n'
        f'netuid = 3\nnetwork = "{_closed_port_url()}"\nwallet_name = "miner"\n'
        f'wallet_path = "{wallet_path}"\n'
    )
    return str(cfg)


def test_bittensor_without_a_wallet_or_a_node_is_one_line(tmp_path, capsys, monkeypatch):
    bt = pytest.importorskip("bittensor", minversion="11")
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "symbols.json"))
    assert main(["miner", "--config", _bittensor_miner(tmp_path, tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load hotkey 'default' of bittensor wallet 'miner'")
    assert "btcli wallet create" in err and len(err.splitlines()) == 1
    wallet = bt.Wallet(name="miner", hotkey="default", path=str(tmp_path / "wallets"))
    wallet.create_new_coldkey(use_password=False, suppress=True)
    wallet.create_new_hotkey(suppress=True)
    env = {"BTCLI_TOKEN_SYMBOLS_CACHE": str(tmp_path / "symbols.json")}
    proc = _cli("miner", "--config", _bittensor_miner(tmp_path, tmp_path / "wallets"), env=env)
    _one_error_line(proc, "cannot reach the bittensor network 'ws://127.0.0.1:")
