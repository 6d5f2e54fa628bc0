"""The WAN link model: spec parsing, and shaping measured on real sockets and a local folder."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from netcomm import (
    Link,
    LinkProxy,
    LinkSpec,
    LocalStorage,
    NetcommConfigError,
    ShapedStorage,
    TokenBucket,
    TransientStorageError,
    parse_link,
)

MB = 1_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100mbit,50ms", LinkSpec(100e6, 100e6, 0.05)),
        ("1gbit", LinkSpec(1e9, 1e9, 0.0)),
        ("10mbit, 20ms", LinkSpec(10e6, 10e6, 0.02)),
        ("up=10mbit,down=1Gbit,rtt=0.1s", LinkSpec(10e6, 1e9, 0.1)),
        ("down=512kbit/s", LinkSpec(None, 512e3, 0.0)),
        ("2.5mbit,500us", LinkSpec(2.5e6, 2.5e6, 0.0005)),
        ("up=unlimited,down=8mbit", LinkSpec(None, 8e6, 0.0)),
        ("30ms", LinkSpec(None, None, 0.03)),
    ],
)
def test_parse_link_reads_rates_and_latency(text, expected):
    spec = parse_link(text)
    assert spec == expected
    assert parse_link(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("fast", "neither a rate"),
        ("100mb", "neither a rate"),
        ("-5ms", "neither a rate"),
        ("sideways=1gbit", "neither a rate"),
        ("100mbit,1gbit", "sets the upload rate twice"),
        ("up=1mbit,10mbit", "sets the upload rate twice"),
        ("50ms,rtt=20ms", "sets the RTT twice"),
        ("0mbit", "finite rate > 0"),
    ],
)
def test_parse_link_rejects_bad_specs_in_one_line(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_link(text)
    assert isinstance(info.value, NetcommConfigError)
    assert "\n" not in str(info.value)


def test_link_spec_validates_its_fields():
    with pytest.raises(NetcommConfigError, match="rtt_s"):
        LinkSpec(rtt_s=-1.0)
    with pytest.raises(NetcommConfigError, match="down_bit_s"):
        LinkSpec(down_bit_s=float("inf"))


def test_token_bucket_paces_threads_sharing_it_to_its_rate():
    bucket = TokenBucket(rate=2 * MB)
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: [bucket.take(50_000) for _ in range(5)], range(4)))
    elapsed = time.monotonic() - start
    expected = (4 * 5 * 50_000 - bucket.burst) / bucket.rate  # 0.47 s
    assert expected * 0.95 <= elapsed <= expected * 1.5 + 0.1


@pytest.fixture
def direct(s3_factory):
    return s3_factory(read_timeout_s=10.0)


def through(s3_factory, proxy: LinkProxy):
    return s3_factory(endpoint=proxy.url, read_timeout_s=10.0, max_attempts=1)


def test_proxy_limits_download_throughput(direct, s3_factory):
    data = os.urandom(3 * MB)
    direct.put("big", data)
    with LinkProxy(direct.config.endpoint_url, parse_link("24mbit,100ms")) as proxy:  # 3 MB/s
        client = through(s3_factory, proxy)
        client.head("big")  # the connection is open before the clock starts
        start = time.monotonic()
        assert client.get("big") == data
        elapsed = time.monotonic() - start
    assert proxy.link.received >= len(data)
    assert 0.9 * 1.1 <= elapsed <= 0.1 + 1.0 / 0.7  # one RTT + 1.0 s; >= 70% of the rate


def test_parallel_downloads_share_one_link(direct, s3_factory):
    data = os.urandom(MB)
    for i in range(3):
        direct.put(f"part-{i}", data)
    link = Link(parse_link("down=24mbit"))  # 3 MB/s for all connections together
    with LinkProxy(direct.config.endpoint_url, link) as a, LinkProxy(a.url, LinkSpec()) as b:
        clients = [through(s3_factory, a), through(s3_factory, a), through(s3_factory, b)]
        start = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda i: clients[i].get(f"part-{i}"), range(3)))
        elapsed = time.monotonic() - start
    assert got == [data] * 3
    assert 0.9 <= elapsed <= 1.0 / 0.7  # 3 MB at 3 MB/s, not 1 MB at 3 MB/s each


def test_proxy_limits_upload_throughput(direct, s3_factory):
    data = os.urandom(2 * MB)
    with LinkProxy(direct.config.endpoint_url, parse_link("up=16mbit")) as proxy:  # 2 MB/s
        client = through(s3_factory, proxy)
        client.list()
        start = time.monotonic()
        client.put("up", data)
        elapsed = time.monotonic() - start
    assert direct.get("up") == data
    assert 0.9 <= elapsed <= 1.0 / 0.7


def test_proxy_adds_the_round_trip_time(direct, s3_factory):
    direct.put("small", b"x" * 100)

    def median_head(storage) -> float:
        storage.head("small")  # opens the connection
        times = []
        for _ in range(3):
            start = time.monotonic()
            storage.head("small")
            times.append(time.monotonic() - start)
        return statistics.median(times)

    bare = median_head(direct)
    with LinkProxy(direct.config.endpoint_url, parse_link("200ms")) as proxy:
        shaped = median_head(through(s3_factory, proxy))
    assert 0.19 <= shaped - bare <= 0.3


def test_stopped_proxy_drops_its_connections(direct, s3_factory):
    direct.put("k", b"v")
    proxy = LinkProxy(direct.config.endpoint_url, LinkSpec()).start()
    client = through(s3_factory, proxy)
    assert client.get("k") == b"v"
    proxy.stop()
    with pytest.raises(TransientStorageError):
        client.get("k")


def test_proxy_forwards_to_loopback_only():
    with pytest.raises(NetcommConfigError, match="loopback"):
        LinkProxy("http://example.com:80", LinkSpec())


def test_shaped_storage_paces_a_local_folder(tmp_path):
    local = LocalStorage(tmp_path)
    shaped = ShapedStorage(local, parse_link("8mbit,100ms"))  # 1 MB/s
    data = os.urandom(MB // 2)
    start = time.monotonic()
    shaped.put("k", data)
    put_s = time.monotonic() - start
    start = time.monotonic()
    assert shaped.get_range("k", 0, len(data)) == data
    get_s = time.monotonic() - start
    start = time.monotonic()
    shaped.head("k")
    head_s = time.monotonic() - start
    expected = 0.1 + (len(data) - shaped.link.up.bucket.burst) / MB  # round trip + bytes
    assert expected * 0.95 <= put_s <= expected + 0.3
    assert expected * 0.95 <= get_s <= expected + 0.3
    assert 0.1 <= head_s <= 0.3
    assert (shaped.link.sent, shaped.link.received) == (len(data), len(data))


def test_a_link_can_pace_messages_smaller_than_the_default_burst():
    default, small = Link(parse_link("8mbit")), Link(parse_link("8mbit"), burst_bytes=1500)
    assert default.up.bucket.burst >= 64 * 1024
    assert small.up.bucket.burst == small.down.bucket.burst == 1500
    start = time.monotonic()
    small.up(1500 + 100_000)  # 0.1 MB past the burst at 1 MB/s
    assert time.monotonic() - start > 0.08
