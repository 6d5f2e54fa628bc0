"""chain.kind = 'local': nodes of separate processes meet on one SQLite chain file."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gauntlet import ChainError, SqliteChain
from subnet import NodeConfigError, config_from_dict
from subnet.chain import open_chain


def _cfg(role: str, hotkey: str, path, stake: float = 0.0, block_time_s: float = 12.0):
    return config_from_dict(
        {
            "role": role,
            "hotkey": hotkey,
            "window": {"block_time_s": block_time_s},
            "chain": {"kind": "local", "path": str(path), "stake": stake},
        }
    )


def test_local_config_needs_a_path_and_a_hotkey(tmp_path):
    with pytest.raises(NodeConfigError, match=r"chain\.path"):
        config_from_dict({"role": "miner", "hotkey": "a", "chain": {"kind": "local", "path": ""}})
    with pytest.raises(NodeConfigError, match="hotkey"):
        config_from_dict({"role": "miner", "chain": {"kind": "local"}})


def test_a_node_in_another_process_sees_this_ones_registration(tmp_path):
    path = tmp_path / "chain.sqlite"
    chain = open_chain(_cfg("validator", "val", path, stake=5.0))
    assert isinstance(chain, SqliteChain)
    code = (
        "import sys; from subnet import config_from_dict;"
        "from subnet.chain import open_chain;"
        f"c = open_chain(config_from_dict({{'role': 'miner', 'hotkey': 'm0', 'chain': "
        f"{{'kind': 'local', 'path': {str(path)!r}}}}})); c.commit('bucket:m0')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    mg = chain.metagraph()
    assert mg.hotkeys == ["val", "m0"] and mg.stakes == [5.0, 0.0]
    assert chain.get_commitment("m0") == "bucket:m0"
    assert chain.set_weights([1], [65535]).success


def test_a_different_block_time_is_refused(tmp_path):
    path = tmp_path / "chain.sqlite"
    open_chain(_cfg("miner", "m0", path))
    with pytest.raises(ChainError, match="block_time_s"):
        open_chain(_cfg("miner", "m1", path, block_time_s=1.0))
