"""exchange.link: a node's storage traffic goes over its modelled link."""

import time

import pytest

from netcomm import LocalStorage, S3Config, S3Storage
from subnet.commitments import Locator, key_digest
from subnet.config import ExchangeSettings, NodeConfigError, Secret, StorageConfig
from subnet.storage import NodeLink, open_own_storage, open_peer_storage


def test_s3_bytes_go_through_the_link_proxy(moto_url):
    S3Storage(
        S3Config(bucket="linked", endpoint_url=moto_url, access_key_id="k", secret_access_key="s")
    ).create_bucket()
    link = NodeLink("8mbit,20ms")
    cfg = StorageConfig(
        kind="s3",
        bucket="linked",
        endpoint_url=moto_url,
        access_key_id="k",
        secret_access_key=Secret("s"),
    )
    try:
        storage = open_own_storage(cfg, "m", None, link)
        blob = bytes(500_000)
        start = time.monotonic()
        storage.put("x", blob)
        assert storage.get("x") == blob
        seconds = time.monotonic() - start
    finally:
        link.close()
    assert link.link.sent >= len(blob) and link.link.received >= len(blob)
    assert seconds > 2 * 8 * len(blob) / 8e6 * 0.8  # 0.5 MB up and down at 1 MB/s


def test_a_local_folder_is_timed_by_the_link(tmp_path):
    link = NodeLink("8mbit")
    storage = open_own_storage(StorageConfig(kind="local", root=str(tmp_path)), "m", None, link)
    start = time.monotonic()
    storage.put("x", bytes(800_000))
    assert time.monotonic() - start > 0.6  # 0.8 MB at 1 MB/s
    assert isinstance(open_own_storage(StorageConfig(root=str(tmp_path)), "m"), LocalStorage)
    # the other peers' storage goes over the same link
    loc = Locator(kind="local", role="miner", key_digest=key_digest(b"k" * 32), prefix="m")
    peer = open_peer_storage(loc, tmp_path, None, link)
    assert peer.get("x") == bytes(800_000)
    assert (link.link.sent, link.link.received) == (800_000, 800_000)


def test_bad_links_are_config_errors():
    with pytest.raises(NodeConfigError, match=r"exchange\.link"):
        ExchangeSettings(link="fast please")
    link = NodeLink("1gbit")
    with pytest.raises(NodeConfigError, match="endpoint_url"):
        link.endpoint("")
    with pytest.raises(NodeConfigError, match="loopback"):
        link.endpoint("https://example.com")
