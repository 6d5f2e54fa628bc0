"""One data-fabrication epoch end to end: submissions → sandbox → checks → scores → weights.

``python -m examples.data_fabrication [--out DIR] [--seed S] [--count N]`` from the
repository root. Accepted pairs (valid, correct, original) are written to the bucket as
``DIR/bucket/data-fabrication-accepted/<epoch>/<hotkey>.jsonl``, and ``epochs.json`` there
records the order in which epochs first ran; a later epoch (another seed) in the same bucket
checks its submissions against the accepted data of the epochs before it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from examples.common.settle import Settlement, settle
from examples.common.submissions import SubmissionBox
from examples.common.table import format_table
from examples.data_fabrication.config import FabricationConfig
from examples.data_fabrication.miners import submit_demo
from examples.data_fabrication.tasks import Pair, is_correct, parse_line
from examples.data_fabrication.validator import MinerResult, evaluate_epoch
from gauntlet import InMemorySubnet
from netcomm import LocalStorage, ObjectNotFoundError, Storage

VALIDATOR = "validator"
CHALLENGE = "data-fabrication"
ACCEPTED = f"{CHALLENGE}-accepted"
EPOCHS = f"{ACCEPTED}/epochs.json"


def epoch_segment(seed: str) -> str:
    """The epoch's storage key segment: the seed itself if it is a valid one, else its hash."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", seed):
        return seed
    return "seed-" + hashlib.blake2b(seed.encode(), digest_size=8).hexdigest()


def epoch_order(storage: Storage) -> list[str]:
    """Epoch key segments in the order the epochs first ran in this bucket."""
    try:
        order = json.loads(storage.get(EPOCHS))
    except ObjectNotFoundError:
        return []
    if not isinstance(order, list) or not all(isinstance(e, str) for e in order):
        raise ValueError(f"{EPOCHS} must be a JSON list of epoch names")
    return order


def load_accepted(storage: Storage, seed: str) -> dict[str, list[Pair]]:
    """Accepted data of the epochs that ran before ``seed``'s, as ``hotkey@epoch`` → pairs.

    Seeds have no order of their own, so :func:`epoch_order` gives it. An epoch never sees its
    own or a later epoch's data: running it again gives the same result.
    """
    order = epoch_order(storage)
    me = epoch_segment(seed)
    before = set(order[: order.index(me)] if me in order else order)
    out: dict[str, list[Pair]] = {}
    for info in sorted(storage.list(ACCEPTED + "/"), key=lambda i: i.key):
        parts = info.key.split("/")
        if len(parts) != 3 or parts[1] not in before or not parts[2].endswith(".jsonl"):
            continue
        lines = storage.get(info.key).decode("utf-8", "replace").splitlines()
        pairs = [p for p in map(parse_line, lines) if p is not None]
        out[f"{parts[2].removesuffix('.jsonl')}@{parts[1]}"] = pairs
    return out


@dataclass(frozen=True)
class EpochResult:
    """Per-miner results (ranked by score) and the settlement on the chain."""

    results: list[MinerResult]
    settlement: Settlement


def run_epoch(
    cfg: FabricationConfig, workdir: Path, log: Callable[[str], None] = lambda _: None
) -> EpochResult:
    """Run the demo epoch in ``workdir``."""
    subnet = InMemorySubnet(netuid=100)
    subnet.register(VALIDATOR, stake=1000.0)
    storage = LocalStorage(workdir / "bucket", fsync=False)
    box = SubmissionBox(storage, CHALLENGE)
    submit_demo(box, subnet)
    submissions, rejected = box.collect(subnet.connect(VALIDATOR))
    for r in rejected:
        log(f"rejected {r.key}: {r.reason}")
    earlier = load_accepted(storage, cfg.seed)
    if earlier:
        log(f"pass 1 also compares against {len(earlier)} accepted data sets of earlier epochs")
    results = evaluate_epoch(submissions, cfg, log, earlier)
    for res in results:
        if res.score > 0:
            accepted = [p for p in res.pairs if is_correct(p)]
            storage.put(
                f"{ACCEPTED}/{epoch_segment(cfg.seed)}/{res.hotkey}.jsonl",
                "".join(json.dumps(p.__dict__) + "\n" for p in accepted).encode(),
            )
    order = epoch_order(storage)
    if epoch_segment(cfg.seed) not in order:
        storage.put(EPOCHS, json.dumps([*order, epoch_segment(cfg.seed)]).encode())
    settlement = settle(subnet, VALIDATOR, {r.hotkey: r.score for r in results})
    ranked = sorted(results, key=lambda r: (-r.score, r.block, r.hotkey))
    return EpochResult(ranked, settlement)


def results_table(epoch: EpochResult) -> str:
    """Ranked miners with each factor of the score, the plagiarism verdict and the weight."""
    rows = []
    for rank, r in enumerate(epoch.results, start=1):
        ran = r.status == "ok"
        plag = r.plagiarism
        rows.append(
            [
                rank,
                r.hotkey,
                r.status if ran else f"{r.status} ({r.detail})",
                f"{r.format_score:.2f}" if ran else "-",
                f"{r.quality:.2f}" if ran else "-",
                f"{r.diversity:.2f}" if ran else "-",
                plag.verdict if plag else "-",
                plag.describe() if plag else "",
                f"{r.score:.3f}",
                f"{epoch.settlement.weights.get(r.hotkey, 0.0):.3f}",
            ]
        )
    headers = ["#", "hotkey", "run", "format", "quality", "diverse", "verdict", "similarity"]
    return format_table([*headers, "score", "weight"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.data_fabrication", description=__doc__
    )
    parser.add_argument("--out", default="runs/data_fabrication", help="bucket folder")
    parser.add_argument("--seed", default=FabricationConfig.seed, help="the epoch's public seed")
    parser.add_argument("--count", type=int, default=FabricationConfig.count, help="pairs per run")
    args = parser.parse_args(argv)
    epoch = run_epoch(FabricationConfig(seed=args.seed, count=args.count), Path(args.out), print)
    print()
    print(results_table(epoch))
    print(f"\nchain: {epoch.settlement.result.message}")
    return 0
