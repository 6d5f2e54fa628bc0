"""The ``sparseloco`` command.

``sparseloco simulate`` runs a local multi-peer swarm; ``sparseloco miner`` /
``sparseloco validator`` / ``sparseloco demo`` run the deployment roles (:mod:`subnet`).
A user's mistake (bad flag value, unreadable file, unwritable ``--out``, missing S3
credentials) is one ``error: ...`` line on stderr and exit code 2, and leaves no run folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from sparseloco import __version__
from sparseloco.config import PRESETS
from sparseloco.errors import ConfigError, SparseLoCoError
from sparseloco.models.gpt import GPTConfig


def _simulate(args: argparse.Namespace) -> int:
    from subnet.sim import ADVERSARY_KINDS, SimConfig, run

    adversaries: tuple[str, ...] = ()
    if args.adversaries:
        adversaries = (
            ADVERSARY_KINDS
            if args.adversaries == "all"
            else tuple(a.strip() for a in args.adversaries.split(",") if a.strip())
        )
    out = Path(args.out) if args.out else Path("runs") / time.strftime("sim-%Y%m%d-%H%M%S")
    if args.model_config:
        try:
            model = GPTConfig.from_dict(json.loads(Path(args.model_config).read_text()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--model-config {args.model_config}: {exc}") from None
    else:
        model = GPTConfig(
            block_size=args.block_size, n_layer=args.layers, n_head=args.heads, n_embd=args.width
        )
    cfg = SimConfig(
        peers=args.peers,
        windows=args.windows,
        inner_steps=args.inner_steps,
        batch_size=args.batch_size,
        inner_lr=args.inner_lr,
        model=model,
        preset=args.preset,
        outer_lr=args.outer_lr,
        adversaries=adversaries,
        aggregate=args.aggregate,
        storage=args.storage or "",
        s3_endpoint=args.s3_endpoint,
        data=args.data,
        seed=args.seed,
        out=out,
        validators=args.validators,
        window_s=args.window_s,
        link=args.link or "",
        skip_idle=not args.real_time,
        eval_samples=args.eval_samples,
        overlap=args.overlap or args.apply_after is not None,
        apply_after=args.apply_after or 0,
        apply_wait=not args.no_wait,
    )
    _check_s3_credentials(cfg.storage)
    created = _make_run_folder(out)
    try:
        result = run(cfg, progress=not args.quiet, echo=not args.quiet)
    except (SparseLoCoError, OSError):
        # A run that fails on the user's input leaves nothing half-written behind.
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    s = result.summary
    print(
        f"\nheld-out loss {s['heldout_loss_initial']:.3f} -> {s['heldout_loss_final']:.3f} "
        f"over {s['windows']} windows ({s['tokens_per_peer']:,} tokens per peer), "
        f"{s['seconds']:.0f} s"
    )
    print(
        f"bytes sent per peer per window: {s['bytes_sent_per_window_mean']:,.0f} "
        f"({s['compression_vs_fp32']:.0f}x less than dense fp32)"
    )
    print("final weights: " + json.dumps({k: round(v, 3) for k, v in s["final_weights"].items()}))
    print(f"wrote {out}/metrics.jsonl, summary.json, loss.png, weights.png")
    return 0


def _make_run_folder(out: Path) -> bool:
    """Create ``out`` (or check it is a writable folder); True when this call created it."""
    existed = out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"--out {out} is not a writable folder ({exc.strerror or exc}); "
            "pick another path or fix its permissions"
        ) from None
    return not existed


def _check_s3_credentials(storage: str) -> None:
    """Fail before the run starts when s3:// storage has no credentials to use."""
    if not storage.startswith("s3://"):
        return
    import boto3

    if boto3.Session().get_credentials() is None:
        raise ConfigError(
            f"--storage {storage} needs S3 credentials: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment"
        )


NODE_COMMANDS = {
    "miner": "run a miner from a TOML config (see docs/miner.md)",
    "validator": "run a validator from a TOML config",
    "demo": "N miners and a validator, each its own process, on a fresh local chain",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in NODE_COMMANDS:
        from subnet.roles_cli import main as node_main

        return node_main(argv, prog="sparseloco")
    parser = argparse.ArgumentParser(
        prog="sparseloco",
        description="SparseLoCo training: a local swarm simulation and the deployment roles.",
    )
    parser.add_argument("--version", action="version", version=f"sparseloco {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    sim_help = "run N miners and a validator on this machine, each its own process"
    sim = sub.add_parser("simulate", help=sim_help, description=sim_help.capitalize() + ".")
    # Listed for --help only: main() hands these to subnet.roles_cli before parsing.
    for name, line in NODE_COMMANDS.items():
        sub.add_parser(name, help=line)
    sim.add_argument("--peers", type=int, default=4, help="honest peers (default %(default)s)")
    sim.add_argument("--windows", type=int, default=12, help="outer rounds (default %(default)s)")
    sim.add_argument(
        "--inner-steps", type=int, default=10, help="H, inner steps a window (default %(default)s)"
    )
    sim.add_argument(
        "--batch-size", type=int, default=8, help="sequences per inner step (default %(default)s)"
    )
    sim.add_argument(
        "--inner-lr", type=float, default=2e-3, help="AdamW learning rate (default %(default)s)"
    )
    sim.add_argument("--outer-lr", type=float, default=None, help="override the preset's α")
    sim.add_argument(
        "--preset",
        default="covenant-72b",
        choices=sorted(PRESETS),
        help="codec and outer-step settings (default %(default)s)",
    )
    sim.add_argument("--layers", type=int, default=2, help="GPT blocks (default %(default)s)")
    sim.add_argument("--heads", type=int, default=4, help="attention heads (default %(default)s)")
    sim.add_argument("--width", type=int, default=64, help="embedding width (default %(default)s)")
    sim.add_argument(
        "--block-size", type=int, default=64, help="context length (default %(default)s)"
    )
    sim.add_argument(
        "--model-config",
        help="a GPTConfig JSON (e.g. PRISM's winner_gpt.json); replaces the four flags above",
    )
    sim.add_argument(
        "--adversaries",
        default="",
        help="comma-separated kinds (free-rider,noise,copier,stale,wrong-data,poisoner) or 'all'",
    )
    sim.add_argument(
        "--aggregate",
        choices=["top", "all"],
        default="top",
        help="aggregate the updates the validator accepted, or every valid one "
        "(default %(default)s)",
    )
    sim.add_argument("--storage", help="folder or s3://bucket/prefix (default <out>/storage)")
    sim.add_argument("--s3-endpoint", help="endpoint URL for s3:// storage (R2, MinIO, ...)")
    sim.add_argument("--data", help="text files or token shards (default: Python's stdlib)")
    sim.add_argument(
        "--seed", type=int, default=0, help="public seed of data and init (default %(default)s)"
    )
    sim.add_argument(
        "--validators",
        type=int,
        default=1,
        help="validator processes; each scores every window and sets weights (default %(default)s)",
    )
    sim.add_argument(
        "--window-s",
        type=float,
        default=None,
        help="seconds per window on the local chain (default 0.6 per miner, at least 1)",
    )
    sim.add_argument(
        "--link",
        help="each node's modelled network link, e.g. 100mbit,50ms or up=10mbit,down=1gbit "
        "(real socket bytes paced for loopback s3:// storage; call timing for a local folder)",
    )
    sim.add_argument(
        "--eval-samples",
        type=int,
        default=64,
        metavar="N",
        help="samples the validator evaluates per peer, on its assigned data and on a shared "
        "random set (default %(default)s; fewer score faster and noisier)",
    )
    sim.add_argument(
        "--overlap",
        action="store_true",
        help="miners train the next window while the last one is scored and aggregated; its "
        "aggregate is applied one window late (miner.overlap)",
    )
    sim.add_argument(
        "--apply-after",
        type=int,
        default=None,
        metavar="TAU",
        help="with --overlap (implied): apply the last window's aggregate TAU inner steps "
        "into the next window instead of at its end",
    )
    sim.add_argument(
        "--no-wait",
        action="store_true",
        help="with --apply-after: apply the aggregate at the first step from TAU on at which "
        "it has arrived (else at the window's end) instead of waiting for it at TAU "
        "(miner.apply_wait = false)",
    )
    sim.add_argument(
        "--real-time",
        action="store_true",
        help="windows last --window-s even when every node waits (default: the local chain "
        "skips ahead as soon as every node waits for the next window)",
    )
    sim.add_argument("--out", help="run folder (default runs/sim-<time>)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    args = parser.parse_args(argv)
    try:
        return _simulate(args)
    except SparseLoCoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"error: cannot use{where}: {exc.strerror or exc}; check --out, --storage and "
            "--data paths and their permissions",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
