"""Console table and PNG plots of a simulated run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def window_table(record: dict[str, Any], participants: list, window: int) -> str:
    """One window's table: per peer loss, bytes, validator status, score and weight."""
    logs = {p.peer: p for p in participants}
    lines = [
        f"window {window}  held-out loss {record['heldout_loss']:.4f}  "
        f"aggregated {len(record['aggregated'])} peers",
        f"  {'peer':<16}{'kind':<12}{'train':>8}{'sent':>9}{'recv':>9}  "
        f"{'status':<10}{'gain':>8}{'sync':>6}{'score':>8}{'weight':>8}",
    ]
    for peer, v in record["validator"].items():
        part = logs.get(peer)
        entry = next((w for w in part.windows if w["window"] == window), {}) if part else {}
        lines.append(
            f"  {peer:<16}{(part.kind if part else '?'):<12}"
            f"{_num(entry.get('train_loss'), '.3f'):>8}"
            f"{entry.get('bytes_sent', 0):>9}{entry.get('bytes_received', 0):>9}  "
            f"{v['status']:<10}{_num(v['gain_random'], '.4f'):>8}{_num(v['sync'], '.2f'):>6}"
            f"{v['score']:>8.3f}{v['weight']:>8.3f}"
        )
    return "\n".join(lines)


def plot_run(
    out: Path, records: list[dict[str, Any]], participants: list, initial: float
) -> list[str]:
    """loss.png (train loss per peer and held-out loss vs tokens) and weights.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return []
    tokens = [r["tokens_per_peer"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for part in participants:
        pts = [(tokens[w["window"]], w["train_loss"]) for w in part.windows if "train_loss" in w]
        pts = [(t, v) for t, v in pts if t is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), alpha=0.5, lw=1, label=f"{part.peer} (train)")
    heldout = [initial] + [r["heldout_loss"] for r in records]
    ax.plot([0, *tokens], heldout, "k-o", lw=2, ms=3, label="global, held-out")
    ax.set_xlabel("tokens per peer")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title("SparseLoCo swarm: loss vs tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    loss_path = out / "loss.png"
    fig.savefig(loss_path, dpi=120)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    windows = [r["window"] for r in records]
    for peer in records[-1]["validator"]:
        ax1.plot(
            windows, [r["validator"].get(peer, {}).get("score", 0.0) for r in records], label=peer
        )
        ax2.plot(
            windows, [r["validator"].get(peer, {}).get("weight", 0.0) for r in records], label=peer
        )
    ax1.set_title("validator score per peer")
    ax2.set_title("weight per peer")
    for ax in (ax1, ax2):
        ax.set_xlabel("window")
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    weights_path = out / "weights.png"
    fig.savefig(weights_path, dpi=120)
    plt.close(fig)
    return [str(loss_path), str(weights_path)]
