"""Command line of the node roles: ``sparseloco {miner,validator,demo}``.

``miner`` / ``validator`` run one role from a TOML config until interrupted, for
``--windows`` windows, or through window ``--until-window`` (what a process manager passes
when it restarts a node of a run that ends at a known window). With ``chain.kind = "local"``
(or ``--chain FILE``) each role runs in its own process on a SQLite chain file that all of
them open. The in-memory chain exists only inside one process, so with
``chain.kind = "memory"`` (or ``--local-demo N``) they run the local demo instead: N miners
(2 by default) and the validator, each its own process on a fresh local chain, with the
other role's config from ``--peer-config``. A user's mistake
(bad config, unreadable file, chain file of another subnet) is one ``error: ...`` line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from gauntlet import Chain, GauntletError
from sparseloco.errors import SparseLoCoError
from subnet.adversary import AdversaryMiner
from subnet.base import Node
from subnet.chain import open_chain
from subnet.config import NodeConfig, load_config
from subnet.demo import run_local_demo
from subnet.miner import Miner
from subnet.task import Task, gpt_task
from subnet.validator import Validator

log = logging.getLogger("subnet")


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Run a miner, a validator or the local demo."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for role in ("miner", "validator"):
        p = sub.add_parser(
            role, help=f"run a {role} from a TOML config", description=f"Run a {role}."
        )
        p.add_argument("--config", type=Path, required=True, help=f"the {role}'s TOML file")
        p.add_argument(
            "--chain",
            type=Path,
            default=None,
            metavar="FILE",
            help="use the local SQLite chain FILE shared by every process of the run "
            "(sets chain.kind = 'local' and chain.path)",
        )
        stop = p.add_mutually_exclusive_group()
        stop.add_argument("--windows", type=int, default=None, help="stop after this many windows")
        stop.add_argument(
            "--until-window",
            type=int,
            default=None,
            metavar="W",
            help="stop once window W is done (counted from the chain's window 0)",
        )
        p.add_argument(
            "--local-demo",
            type=int,
            default=None,
            metavar="N",
            help="run the local demo: N miners and the validator as processes",
        )
        other = "validator" if role == "miner" else "miner"
        p.add_argument(
            "--peer-config",
            type=Path,
            default=None,
            help=f"the {other}'s config for the local demo (default: {other}.toml beside --config)",
        )
    demo_help = "N miners and a validator, each its own process, on a fresh local chain"
    p = sub.add_parser("demo", help=demo_help, description=demo_help + ".")
    p.add_argument("--miner-config", type=Path, required=True, help="the miners' TOML file")
    p.add_argument("--validator-config", type=Path, required=True, help="the validator's TOML file")
    p.add_argument("--miners", type=int, default=2, help="miners to run (default %(default)s)")
    p.add_argument("--windows", type=int, default=6, help="windows to run (default %(default)s)")
    return parser


def _demo(miner_cfg: NodeConfig, validator_cfg: NodeConfig, miners: int, windows: int) -> int:
    result = run_local_demo(miner_cfg, validator_cfg, miners=miners, windows=windows)
    for record in result.validator:
        loss = record["heldout_loss"]
        print(
            f"window {record['window']:4d}  held-out loss "
            f"{'-' if loss is None else f'{loss:.4f}'}  accepted {record['accepted']}"
        )
    print("final weights:", json.dumps({k: round(v, 4) for k, v in result.weights.items()}))
    return 0


def _run_role(cfg: NodeConfig, windows: int | None, until: int | None = None) -> int:
    chain = open_chain(cfg)  # first: a wrong wallet or endpoint fails before the data is built
    task = gpt_task(cfg.run)
    node = make_node(cfg, task, chain)
    if windows is not None:
        until = max(node.clock.window(), node.next_window or 0, 0) + windows - 1
    try:
        node.run(until_window=until)
    except KeyboardInterrupt:
        node.stop.set()
    finally:
        node.clock.finished()
    return 0


def make_node(cfg: NodeConfig, task: Task, chain: Chain) -> Node:
    """The role of ``cfg``: a validator, an honest miner or an adversarial one."""
    if cfg.role == "validator":
        return Validator(cfg, task, chain)
    if cfg.miner.behaviour != "honest":
        return AdversaryMiner(cfg, task, chain)
    return Miner(cfg, task, chain)


def _with_chain_file(cfg: NodeConfig, path: Path | None) -> NodeConfig:
    """``cfg`` on the local chain ``path`` when ``--chain`` was given."""
    if path is None:
        return cfg
    return cfg.replace(chain=dataclasses.replace(cfg.chain, kind="local", path=str(path)))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(
            load_config(args.miner_config),
            load_config(args.validator_config),
            args.miners,
            args.windows,
        )
    cfg = _with_chain_file(load_config(args.config), args.chain)
    if cfg.role != args.command:
        print(
            f"error: {args.config} is a {cfg.role} config, not a {args.command} one",
            file=sys.stderr,
        )
        return 2
    if cfg.chain.kind == "memory" or args.local_demo is not None:
        other = "validator" if cfg.role == "miner" else "miner"
        peer_path = args.peer_config or args.config.with_name(f"{other}.toml")
        peer = load_config(peer_path)
        miners = args.local_demo if args.local_demo is not None else 2
        print(
            f"chain.kind = 'memory' lives inside one process: running the local demo with "
            f"{miners} miner(s) and the validator as processes ({peer_path} for the {other})."
        )
        miner_cfg, validator_cfg = (cfg, peer) if cfg.role == "miner" else (peer, cfg)
        return _demo(miner_cfg, validator_cfg, miners, args.windows or 6)
    return _run_role(cfg, args.windows, args.until_window)


def main(argv: Sequence[str] | None = None, prog: str = "python -m subnet") -> int:
    """Run the node command line; returns the exit code (2 for a user's mistake)."""
    args = _parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The SDK logs its connection lifecycle and RPC traffic at INFO (its `-v`); a node's log
    # keeps the SDK's warnings, and a failed connect is this CLI's one error line.
    logging.getLogger("bittensor").setLevel(logging.WARNING)
    try:
        return _dispatch(args)
    except (SparseLoCoError, GauntletError) as exc:
        # Config, storage and chain errors carry a sentence saying what to fix: one line,
        # no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 2


def _os_error(exc: OSError) -> str:
    """One line for a file the node could not create or read (state_dir, storage root)."""
    where = f" {exc.filename}" if exc.filename else ""
    return f"cannot use{where}: {exc.strerror or exc}; check the path and its permissions"
