"""Tier 1: static validation of a submitted config, and its architecture fingerprint.

A submission is a JSON object of :class:`~sparseloco.models.GPTConfig` fields. Only the
architecture fields may be set; the rest are fixed by the round because they are not
architecture and would make scores incomparable or non-deterministic (the forbidden
constructs of a config-only search): ``vocab_size`` (bytes, 256), ``block_size`` (the
locked data's) and ``dropout`` (0, so scoring is deterministic).

The candidate must then build, stay under the parameter cap, and map a (2, block_size)
batch to (2, block_size, 256) logits with a finite loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from examples.prism.config import PrismConfig
from examples.prism.training import build_model
from sparseloco.errors import ConfigError
from sparseloco.models import GPT, GPTConfig

ARCHITECTURE_FIELDS = {
    "n_layer": int,
    "n_embd": int,
    "n_head": int,
    "n_kv_head": (int, type(None)),
    "mlp_ratio": (int, float),
    "norm": str,
    "pos": str,
    "tie_weights": bool,
}


class StaticRejection(ValueError):
    """The candidate failed tier 1; the message says why."""


@dataclass(frozen=True)
class StaticReport:
    """A candidate that passed tier 1."""

    config: GPTConfig
    params: int
    fingerprint: frozenset[str]


def parse_config(body: dict[str, Any], cfg: PrismConfig) -> GPTConfig:
    """The GPTConfig a submission describes; raises :class:`StaticRejection`."""
    forbidden = sorted(set(body) - set(ARCHITECTURE_FIELDS))
    if forbidden:
        raise StaticRejection(f"forbidden fields {forbidden}")
    for name, kind in ARCHITECTURE_FIELDS.items():
        # bool is an int in Python; a depth of True must not pass as 1
        if name in body and (
            not isinstance(body[name], kind) or (kind is not bool and isinstance(body[name], bool))
        ):
            raise StaticRejection(f"{name} has the wrong type: {body[name]!r}")
    try:
        return GPTConfig(vocab_size=256, block_size=cfg.block_size, dropout=0.0, **body)
    except ConfigError as exc:
        raise StaticRejection(f"does not build: {exc}") from exc


def fingerprint(model: GPT) -> frozenset[str]:
    """What makes two configs the same network: parameter shapes plus the shape-free choices.

    Configs that differ only in ways that build identical networks (``mlp_ratio`` 3.0 vs
    3.004 at width 96, ``n_kv_head`` None vs ``n_head``) get identical fingerprints.
    """
    c = model.cfg
    tokens = {f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters()}
    tokens |= {f"heads={c.n_head}/{c.kv_heads}", f"norm={c.norm}", f"pos={c.pos}"}
    return frozenset(tokens)


def check_static(body: dict[str, Any], cfg: PrismConfig) -> StaticReport:
    """Tier 1 for one submission; raises :class:`StaticRejection` with the reason."""
    gpt = parse_config(body, cfg)
    # counted from the config before anything is allocated, so a huge config costs nothing
    counted = count_params(gpt)
    if counted > cfg.param_cap:
        raise StaticRejection(f"{counted:,} parameters > cap {cfg.param_cap:,}")
    model = build_model(gpt, cfg.seed)
    params = model.num_params()
    if params > cfg.param_cap:
        raise StaticRejection(f"{params:,} parameters > cap {cfg.param_cap:,}")
    x = torch.zeros(2, cfg.block_size, dtype=torch.long)
    with torch.no_grad():
        logits, loss = model(x, x)
    if tuple(logits.shape) != (2, cfg.block_size, 256) or not math.isfinite(float(loss)):
        raise StaticRejection(f"forward gives logits {tuple(logits.shape)}, loss {float(loss)}")
    return StaticReport(gpt, params, fingerprint(model))


def count_params(gpt: GPTConfig) -> int:
    """Parameter count from the config alone, following :class:`~sparseloco.models.GPT`."""
    d, hd = gpt.n_embd, gpt.n_embd // gpt.n_head
    hidden = max(1, int(gpt.mlp_ratio * d))
    norm = (2 if gpt.norm == "layernorm" else 1) * d  # LayerNorm has a bias, RMSNorm does not
    per_block = 2 * d * d + 2 * gpt.kv_heads * hd * d + 2 * d * hidden + 2 * norm
    embed = gpt.vocab_size * d * (1 if gpt.tie_weights else 2)
    pos = gpt.block_size * d if gpt.pos == "learned" else 0
    return gpt.n_layer * per_block + embed + pos + norm
