"""Shared test settings, the loopback S3 server every suite that needs one uses, and the
bittensor SDK with its network replaced (``bt_seam``)."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

torch.manual_seed(0)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """An S3-compatible server (moto) on loopback for the whole test session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"
    finally:
        server.stop()


@pytest.fixture
def bt_seam(tmp_path, monkeypatch) -> ModuleType:
    """``tests/_bittensor_seam.py``: the bittensor SDK with its network replaced (skips
    without bittensor 11). The SDK's connect-time cache goes to ``tmp_path``, not ``~``."""
    pytest.importorskip("bittensor", minversion="11")
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path / "token_symbols.json"))
    name = "_bittensor_seam"
    if name not in sys.modules:  # importlib mode does not put tests/ on sys.path
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
