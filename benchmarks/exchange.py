"""Gather throughput of netcomm's StorageExchange next to raw boto3 downloads of the same objects.

A moto S3 server runs on 127.0.0.1 in its own process, so it does not compete with the client
for the GIL (it still shares the machine's cores with both measured sides). Each peer
publishes a synthetic but valid SparseLoCo update (Covenant codec: 64x64 chunks, k=64, 2-bit
values, 12-bit indices) sized like a real one; a 1B-parameter model's update is ~27 MB. Two
scenarios:

* ``peers``: one observer gathers ``--peers`` updates of ``--update-mb`` MB each;
* ``large``: one update of ``--large-mb`` MB (multipart upload, parallel ranged download).

Each is measured twice in the same run: on bare loopback, and through the observer's own
shaped link (``--link``, default ``1gbit``: 1 Gbit/s down and up, no added RTT), a
:class:`netcomm.LinkProxy` in a third process that paces the real bytes between the client's
sockets and the server's. Both sides of a row use the same endpoint.

"raw boto3" downloads exactly the same objects with the same concurrency
(``get_object().read()`` per object; boto3's managed ``download_fileobj`` for the large one),
without any verification; after one unmeasured warm-up round, raw and gather alternate,
``--repeats`` times, and the ratio is the median of raw time / gather time over the repeats.
gather also verifies every envelope completely (signature, checksum, zstd if used,
safetensors caps, index ranges and order, finite values): it hashes each body as its bytes
arrive and checks the rest while the other downloads still run.

Each row also reports the CPU seconds the client, the server and the link process spent in
the raw and the gather phases, and the client's CPU milliseconds for each step on one
envelope (raw download, gather's download with and without hashing, each verification
step), so the ratio can be explained: on a machine whose cores are all busy, gather cannot
be faster than (transfer CPU + verification CPU) / cores.

    python benchmarks/exchange.py            # 20 x 27 MB and 1 x 64 MB, bare and 1 Gbit/s
    python benchmarks/exchange.py --quick    # small sizes, a few seconds
    python benchmarks/exchange.py --link 100mbit,50ms
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from blake3 import blake3

from netcomm import (
    BodyHasher,
    Ed25519Signer,
    EnvelopeLimits,
    ExchangeConfig,
    ModelSpec,
    PeerRecord,
    S3Config,
    S3Storage,
    StaticDirectory,
    StorageExchange,
    default_verifiers,
    open_envelope,
    parse_link,
    read_header,
    read_range,
    update_key,
)
from netcomm.envelope import PREFIX_SIZE
from sparseloco import CodecConfig, CompressedUpdate
from sparseloco.chunking import ChunkLayout
from sparseloco.codec import CompressedTensor
from sparseloco.packing import pack_codes, pack_indices
from sparseloco.payload import payload_from_tensors, validate_payload
from sparseloco.serialization import load_safetensors

SHAPE = (8192, 8192)
CODEC = CodecConfig()


def tensor_bytes() -> int:
    layout = ChunkLayout.for_shape(SHAPE, CODEC.chunk_size)
    count = layout.num_chunks * layout.k(CODEC.topk)
    return 3 * ((count + 1) // 2) + count * CODEC.value_bits // 8 + 4 * CODEC.levels


def synthetic_update(n_tensors: int, seed: int) -> CompressedUpdate:
    """A valid compressed update of ``n_tensors`` 8192x8192 tensors (random codes/indices)."""
    gen = torch.Generator().manual_seed(seed)
    layout = ChunkLayout.for_shape(SHAPE, CODEC.chunk_size)
    k, chunks = layout.k(CODEC.topk), layout.num_chunks
    stride = layout.chunk_numel // k
    tensors = {}
    for i in range(n_tensors):
        offsets = torch.randint(0, stride, (chunks, k), generator=gen)
        idx = torch.arange(0, layout.chunk_numel, stride).expand(chunks, k) + offsets
        codes = torch.randint(0, CODEC.levels, (chunks * k,), generator=gen, dtype=torch.uint8)
        tensors[f"layer{i:03d}.weight"] = CompressedTensor(
            shape=SHAPE,
            indices=pack_indices(idx.reshape(-1), CODEC.index_bits),
            gaps=torch.empty(0, dtype=torch.uint8),
            codes=pack_codes(codes, CODEC.value_bits),
            table=torch.tensor([-1.5, -0.5, 0.5, 1.5]) * 1e-3,
        )
    return CompressedUpdate(codec=CODEC, tensors=tensors)


def spec_for(n_tensors: int) -> ModelSpec:
    return ModelSpec(tuple((f"layer{i:03d}.weight", SHAPE, "bfloat16") for i in range(n_tensors)))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(fn, repeats: int = 5) -> float:
    """Median CPU milliseconds this process spends on ``fn()`` (CPU rather than wall time:
    on a shared machine the wall time also counts other jobs' turns)."""
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return round(statistics.median(times) * 1e3, 2)


def download_costs(storage: S3Storage, bucket: str, key: str, size: int) -> dict[str, float]:
    """Client CPU milliseconds of one download: raw boto3's, gather's (into a writable
    buffer), and gather's with the body hashed as it arrives."""
    client = storage._client
    return {
        "raw_download_ms": timed(lambda: client.get_object(Bucket=bucket, Key=key)["Body"].read()),
        "download_ms": timed(lambda: storage.get_range(key, 0, size)),
        "download_hashing_ms": timed(
            lambda: read_range(storage, key, 0, size, BodyHasher().update)
        ),
    }


def verify_breakdown(blob: bytearray, peer: str, signer, spec: ModelSpec) -> dict[str, float]:
    """CPU milliseconds of each verification step on one downloaded envelope.

    ``open_envelope_ms`` is what is left once the last byte is in (gather hashed the body
    while it arrived); ``open_envelope_hashing_ms`` hashes the body too.
    """
    header, header_len = read_header(blob, EnvelopeLimits())
    start = PREFIX_SIZE + header_len
    body = memoryview(blob)[start : start + header["body_len"]]
    hasher = BodyHasher()
    hasher.update(0, memoryview(blob))
    steps = {  # BLAKE3 is the body's checksum; SHA-256 was it before format version 3
        "blake3_ms": timed(lambda: blake3(body).digest()),
        "sha256_ms": timed(lambda: hashlib.sha256(body).digest()),
    }
    if header["compression"] == "none":
        payload = payload_from_tensors(*load_safetensors(body))
        steps["load_safetensors_ms"] = timed(lambda: load_safetensors(body))
        steps["validate_payload_ms"] = timed(lambda: validate_payload(payload))

    def open_(digest=None):
        return open_envelope(
            blob,
            expected_peer=peer,
            public_key=signer.public_key,
            verifiers=default_verifiers(),
            window=0,
            fingerprint=spec.fingerprint,
            shapes=spec.shapes,
            codec=CODEC,
            body_digest=digest,
        )

    steps["open_envelope_ms"] = timed(lambda: open_(hasher.digest()))
    steps["open_envelope_hashing_ms"] = timed(open_)
    return steps


@dataclass
class Published:
    """One scenario's objects on the server: who published what, and how to verify it."""

    name: str
    bucket: str
    peers: list[str]
    signers: dict
    spec: ModelSpec
    config: ExchangeConfig
    total: int
    publish_s: float
    large: bool


def s3_config(endpoint: str, bucket: str, concurrency: int) -> S3Config:
    return S3Config(
        bucket=bucket,
        endpoint_url=endpoint,
        access_key_id="bench",
        secret_access_key="bench",
        max_concurrency=concurrency,
        read_timeout_s=120,
    )


def publish(name, endpoint, n_peers, n_tensors, concurrency, large, compression) -> Published:
    """Every peer of the scenario publishes its update for window 0 (straight to the server)."""
    storage = S3Storage(s3_config(endpoint, f"bench-{name}", concurrency))
    storage.create_bucket()
    spec = spec_for(n_tensors)
    peers = [f"peer{i:02d}" for i in range(n_peers)]
    signers = {p: Ed25519Signer.from_seed(bytes([i + 1]) * 32) for i, p in enumerate(peers)}
    directory = StaticDirectory(PeerRecord(p, storage, signers[p].public_key) for p in peers)
    config = ExchangeConfig(
        deadline_s=600,
        max_concurrency=concurrency,
        codec=CODEC,
        compression=compression,
        compression_level=1,
    )
    t0 = time.perf_counter()
    total = 0
    for i, p in enumerate(peers):
        ex = StorageExchange(p, storage, directory, signers[p], spec, config)
        total += ex.publish(0, synthetic_update(n_tensors, seed=i))
    publish_s = time.perf_counter() - t0
    storage.close()
    return Published(name, f"bench-{name}", peers, signers, spec, config, total, publish_s, large)


def raw_download(pub: Published, client, concurrency: int, part_size: int) -> int:
    """Raw boto3: every object read whole, no verification (managed download if large)."""
    keys = [update_key("", 0, p) for p in pub.peers]
    if pub.large:
        from boto3.s3.transfer import TransferConfig

        buf = io.BytesIO()
        config = TransferConfig(max_concurrency=concurrency, multipart_chunksize=part_size)
        client.download_fileobj(pub.bucket, keys[0], buf, Config=config)
        return buf.getbuffer().nbytes

    def get(key: str) -> int:
        return len(client.get_object(Bucket=pub.bucket, Key=key)["Body"].read())

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(get, keys))


class CpuMeter:
    """CPU seconds of this process and of the helper processes (server, link) per phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.totals: dict[str, float] = {}

    def run(self, phase: str, fn):
        """(wall seconds, result) of ``fn()``; adds each process's CPU seconds to the phase."""
        before = self._now()
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        for name, value in self._now().items():
            key = f"{phase}_{name}"
            self.totals[key] = self.totals.get(key, 0.0) + value - before[name]
        return elapsed, out

    def _now(self) -> dict[str, float]:
        now = {"client": time.process_time()}
        return now | {name: process_cpu_s(pid) for name, pid in self.pids.items()}


def one_round(pub: Published, reader: S3Storage, observer, concurrency, meter) -> list[float]:
    """[raw seconds, gather seconds] of one download of every object each way."""
    part_size = reader.config.download_part_size
    raw_s, got = meter.run("raw", lambda: raw_download(pub, reader._client, concurrency, part_size))
    assert got == pub.total, (got, pub.total)
    observer._cache.clear()  # every round downloads and verifies again
    observer._seen.clear()
    gather_s, result = meter.run("gather", lambda: observer.gather(0))
    bad = {p: s for p, s in result.statuses.items() if s.status != "ok"}
    assert not bad, bad
    assert result.bytes_received == pub.total
    return [raw_s, gather_s]


def measure(pub: Published, endpoint: str, link: str, pids, concurrency, repeats) -> dict:
    """Raw boto3 and gather of the same objects through ``endpoint``, alternating repeats.

    One unmeasured round first warms the process up (its first large allocations fault
    their pages in), as a long-running peer is after its first window.
    """
    reader = S3Storage(s3_config(endpoint, pub.bucket, concurrency))
    directory = StaticDirectory(PeerRecord(p, reader, pub.signers[p].public_key) for p in pub.peers)
    observer = StorageExchange(
        "observer", reader, directory, Ed25519Signer.generate(), pub.spec, pub.config
    )
    warmup = one_round(pub, reader, observer, concurrency, CpuMeter({}))
    meter = CpuMeter(pids)
    rounds = [one_round(pub, reader, observer, concurrency, meter) for _ in range(repeats)]
    raw_times, gather_times = (list(times) for times in zip(*rounds, strict=True))
    reader.close()
    raw_s, gather_s = statistics.median(raw_times), statistics.median(gather_times)
    ratios = [r / g for r, g in zip(raw_times, gather_times, strict=True)]
    return {
        "scenario": pub.name,
        "link": link,
        "peers": len(pub.peers),
        "object_mb": round(pub.total / len(pub.peers) / 1e6, 2),
        "total_mb": round(pub.total / 1e6, 1),
        "concurrency": concurrency,
        "repeats": repeats,
        "publish_s": round(pub.publish_s, 3),
        "raw_boto3_s": round(raw_s, 3),
        "gather_s": round(gather_s, 3),
        "raw_boto3_mb_s": round(pub.total / raw_s / 1e6, 1),
        "gather_mb_s": round(pub.total / gather_s / 1e6, 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_per_repeat": [round(x, 3) for x in ratios],
        "warmup_raw_gather_s": [round(x, 3) for x in warmup],
        "raw_times_s": [round(x, 3) for x in raw_times],
        "gather_times_s": [round(x, 3) for x in gather_times],
        "cpu_s_per_repeat": {k: round(v / repeats, 3) for k, v in meter.totals.items()},
    }


def verify_costs(pub: Published, endpoint: str) -> dict:
    """Body compression and the download and verification costs of the scenario's first
    object, one step at a time."""
    storage = S3Storage(s3_config(endpoint, pub.bucket, 1))
    key = update_key("", 0, pub.peers[0])
    size = storage.head(key).size
    blob = storage.get_range(key, 0, size)  # as gather downloads it
    downloads = download_costs(storage, pub.bucket, key, size)
    storage.close()
    peer = pub.peers[0]
    return {
        "compression": read_header(blob, EnvelopeLimits())[0]["compression"],
        "verify_one_envelope": downloads
        | verify_breakdown(blob, peer, pub.signers[peer], pub.spec),
    }


def start_server() -> tuple[subprocess.Popen, str]:
    """A moto S3 server in a child process on a free loopback port; waits until it answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)


def start_link(upstream: str, spec: str) -> tuple[subprocess.Popen, str]:
    """A :class:`netcomm.LinkProxy` in a child process (so it takes no GIL from the client)."""
    proxy, urls = start_links(upstream, spec, 1)
    return proxy, urls[0]


def start_links(
    upstream: str, spec: str, n: int, burst_bytes: float | None = None
) -> tuple[subprocess.Popen, list[str]]:
    """``n`` LinkProxies (one :class:`netcomm.Link` each) in a child process; it and their
    URLs. ``burst_bytes``: see :class:`netcomm.Link`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _LINK_SCRIPT, upstream, spec, str(n), repr(burst_bytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    urls = proc.stdout.readline().split()  # type: ignore[union-attr]
    if len(urls) != n:
        proc.kill()
        raise RuntimeError("the link proxies did not start")
    return proc, urls


_LINK_SCRIPT = """
import ast, sys
from netcomm import Link, LinkProxy, parse_link
spec, burst = parse_link(sys.argv[2]), ast.literal_eval(sys.argv[4])
proxies = [LinkProxy(sys.argv[1], Link(spec, burst)).start() for _ in range(int(sys.argv[3]))]
print(" ".join(p.url for p in proxies), flush=True)
sys.stdin.read()  # serve until the parent closes stdin
"""


def print_table(rows: list[dict]) -> None:
    head = f"{'scenario':<9}{'link':<8}{'peers':>6}{'MB/obj':>8}{'total MB':>10}{'raw s':>8}"
    head += f"{'gather s':>10}{'raw MB/s':>10}{'gather MB/s':>13}{'ratio':>7}"
    print(head)
    for r in rows:
        print(
            f"{r['scenario']:<9}{r['link']:<8}{r['peers']:>6}{r['object_mb']:>8}"
            f"{r['total_mb']:>10}{r['raw_boto3_s']:>8}{r['gather_s']:>10}"
            f"{r['raw_boto3_mb_s']:>10}{r['gather_mb_s']:>13}{r['ratio']:>7}"
        )
    for r in rows:
        costs = ", ".join(f"{k[:-3]} {v}" for k, v in r["verify_one_envelope"].items())
        print(
            f"{r['scenario']}/{r['link']}: body {r['compression']}; CPU s per repeat "
            f"{r['cpu_s_per_repeat']}; one envelope (client CPU ms): {costs}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--update-mb", type=float, default=27.0, help="size of one peer update")
    parser.add_argument("--large-mb", type=float, default=64.0, help="size of the large object")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--link", default="1gbit", help="the shaped link (netcomm.parse_link)")
    parser.add_argument(
        "--compression", choices=("auto", "zstd", "none"), default="auto", help="publishers' choice"
    )
    parser.add_argument("--quick", action="store_true", help="4 peers x 4 MB, 16 MB, 1 repeat")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "exchange.json"))
    args = parser.parse_args()
    if args.quick:
        args.peers, args.update_mb, args.large_mb, args.repeats = 4, 4.0, 16.0, 1
    link = str(parse_link(args.link))
    load_before = os.getloadavg()
    server, endpoint = start_server()
    proxy, shaped = start_link(endpoint, link)
    pids = {"server": server.pid, "link": proxy.pid}
    per_tensor = tensor_bytes()
    rows = []
    try:
        for name, peers, mb, large in (
            ("peers", args.peers, args.update_mb, False),
            ("large", 1, args.large_mb, True),
        ):
            n_tensors = max(1, round(mb * 1e6 / per_tensor))
            pub = publish(
                name, endpoint, peers, n_tensors, args.concurrency, large, args.compression
            )
            costs = verify_costs(pub, endpoint)
            for label, url in (("bare", endpoint), (link, shaped)):
                row = measure(pub, url, label, pids, args.concurrency, args.repeats)
                rows.append(row | costs)
    finally:
        for child in (proxy, server):
            child.terminate()
            child.wait(timeout=10)
    print_table(rows)
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    out = {
        "command": " ".join(["python", "benchmarks/exchange.py", *sys.argv[1:]]),
        "args": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
        },
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
