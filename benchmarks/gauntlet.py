"""Cost of Gauntlet scoring on CPU: seconds per evaluated peer for a given model size.

Builds an MLP of ``--depth`` hidden layers of ``--width`` units, ``--peers`` random
pseudo-gradients compressed with the Covenant codec (64×64 chunks, k=64, 2-bit values), and
scores one window with :class:`gauntlet.Scorer` (decode, copy detection, baseline, one
evaluation per peer). Prints a table and writes ``benchmarks/results/gauntlet.json``.

    python benchmarks/gauntlet.py --quick
    python benchmarks/gauntlet.py --width 1024 2048 --depth 4 --peers 8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

# Run as a file, this folder would come first on sys.path (and its gauntlet.py would shadow the
# gauntlet package); the repository root goes there instead, for ``benchmarks.*`` imports.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gauntlet import AssignmentConfig, GauntletConfig, Scorer, WindowInputs  # noqa: E402
from sparseloco import CodecConfig, ErrorFeedback, encode  # noqa: E402
from sparseloco.exchange import GatherResult, PeerStatus  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "gauntlet.json"


def mlp(width: int, depth: int, dim: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(dim, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, dim))
    return nn.Sequential(*layers)


def run_case(width: int, depth: int, peers: int, batch: int, eval_samples: int) -> dict:
    torch.manual_seed(0)
    dim = 256
    model = mlp(width, depth, dim)
    n_params = sum(p.numel() for p in model.parameters())
    data_x = torch.randn(4096, dim)
    data_y = torch.randn(4096, dim)

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.mse_loss(m(b[0]), b[1])

    def batches_for(ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.tensor(ids)
        return [
            (data_x[idx[i : i + batch]], data_y[idx[i : i + batch]])
            for i in range(0, len(idx), batch)
        ]

    codec = CodecConfig(backend="torch")
    cfg = GauntletConfig(
        assignment=AssignmentConfig(
            num_samples=4096,
            samples_per_peer=eval_samples,
            eval_assigned=eval_samples,
            eval_random=eval_samples,
        )
    )
    scorer = Scorer(model, loss_fn, batches_for, seed="bench", config=cfg, codec=codec)
    gather = GatherResult(window=0)
    digests, times = {}, {}
    t0 = time.perf_counter()
    for i in range(peers):
        peer = f"peer-{i}"
        delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
        gather.updates[peer] = encode(delta, ErrorFeedback(codec))
        gather.statuses[peer] = PeerStatus(peer, "ok")
        digests[peer] = scorer.expected_digest(peer, 0)
        times[peer] = float(i)
    encode_s = time.perf_counter() - t0
    report = scorer.score_window(WindowInputs(0, gather, "eval-seed", times, digests))
    tm = report.timings
    evaluated = sum(o.status == "evaluated" for o in report.outcomes.values())
    return {
        "width": width,
        "depth": depth,
        "params": n_params,
        "peers": peers,
        "eval_samples": eval_samples,
        "evaluated": evaluated,
        "encode_per_peer_s": encode_s / peers,
        "decode_s": tm["decode"],
        "copy_detection_s": tm["copy_detection"],
        "baseline_s": tm.get("baseline", 0.0),
        "evaluate_s": tm.get("evaluate", 0.0),
        "eval_per_peer_s": tm.get("evaluate", 0.0) / max(evaluated, 1),
        "window_total_s": tm["total"],
        "window_per_peer_s": tm["total"] / peers,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--depth", type=int, default=4, help="hidden layers (default 4)")
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=64,
        help="samples in the assigned and in the random evaluation set",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="one small case (CI smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [256] if args.quick else args.width
    peers = 4 if args.quick else args.peers
    rows = [run_case(w, args.depth, peers, args.batch, args.eval_samples) for w in widths]
    head = (
        f"{'params':>10} {'peers':>5} {'decode':>8} {'copy':>8} {'baseline':>9} "
        f"{'eval/peer':>10} {'window/peer':>12}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['params']:>10,} {r['peers']:>5} {r['decode_s']:>8.3f} "
            f"{r['copy_detection_s']:>8.3f} {r['baseline_s']:>9.3f} "
            f"{r['eval_per_peer_s']:>10.4f} {r['window_per_peer_s']:>12.4f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "gauntlet",
                "device": "cpu",
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "quick": args.quick,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
