"""Shared test settings and the loopback S3 server every suite that needs one uses."""

from __future__ import annotations

import logging
from collections.abc import Iterator

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
