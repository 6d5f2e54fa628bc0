"""The shipped example configs through the command line: a local demo that resumes."""

from __future__ import annotations

from pathlib import Path

from subnet.roles_cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_example_configs_run_the_local_demo_and_resume(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.chdir(tmp_path)  # the configs' relative paths land in tmp_path/runs/node
    assert main(["miner", "--config", str(EXAMPLES / "miner.toml"), "--windows", "1"]) == 0
    out = capsys.readouterr().out
    assert "running the local demo with 2 miner(s)" in out
    lines = [x for x in out.splitlines() if x.startswith("window")]
    assert [x.split()[1] for x in lines] == ["0"]
    assert all("accepted ['miner-0', 'miner-1']" in x for x in lines)
    for node in ("miner-0", "miner-1", "validator"):
        assert (tmp_path / "runs/node" / node / "ed25519.key").exists()
    assert (tmp_path / "runs/node/miner-0/checkpoints/latest.json").exists()
    assert (tmp_path / "runs/node/storage/validator/selection/000000000000.json").exists()

    # Run again from the validator's side: every node resumes at window 1.
    args = ["validator", "--config", str(EXAMPLES / "validator.toml"), "--windows", "1"]
    assert main(args) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("window")]
    assert [x.split()[1] for x in lines] == ["1"]


def test_role_mismatch_is_refused(capsys):
    assert main(["validator", "--config", str(EXAMPLES / "miner.toml")]) == 2
    assert "is a miner config" in capsys.readouterr().err
