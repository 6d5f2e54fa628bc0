"""What a run trains: a model factory, a loss and a data source addressed by sample id.

Miners and validators work with any :class:`Task`; :func:`gpt_task` builds the library's
small byte-level GPT on the Python standard library's sources (or ``run.data.path``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gauntlet import LossFn, derive_seed
from sparseloco.data import TokenDataset, load_tokens, stdlib_corpus
from sparseloco.models.gpt import GPT
from subnet.config import NodeConfigError, RunConfig


@dataclass(frozen=True)
class Task:
    """The model and data every node of a run shares.

    Attributes:
        make_model: a new model with the run's initial weights (identical on every node).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batch: sample ids → one batch.
        num_samples: size of the sample-id space ``[0, num_samples)``.
        contents: sample ids → their contents, hashed into the proof of data (optional).
        heldout: ``n`` → ``n`` held-out batches for the validator's loss log (optional).
    """

    make_model: Callable[[], nn.Module]
    loss_fn: LossFn
    batch: Callable[[Sequence[int]], Any]
    num_samples: int
    contents: Callable[[Sequence[int]], list[Any]] | None = None
    heldout: Callable[[int], list[Any]] | None = None


def gpt_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of a :class:`GPT` on ``(inputs, targets)``."""
    _, loss = model(batch[0], batch[1])
    if loss is None:
        raise ValueError("the model returned no loss; pass targets")
    return loss


def gpt_task(run: RunConfig) -> Task:
    """The byte-level GPT of ``run.model`` on ``run.data``, initialised from ``run.seed``."""
    if run.data.path:
        tokens = load_tokens(run.data.path, max_tokens=run.data.corpus_bytes)
    else:
        tokens = stdlib_corpus(run.data.corpus_bytes)
    data = TokenDataset(tokens, run.model.block_size)
    if data.vocab_size > run.model.vocab_size:
        raise NodeConfigError(
            f"the data has token ids up to {data.vocab_size - 1}; raise run.model.vocab_size"
        )
    # Initial weights from the public seed, without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(run.seed, "init") % 2**63)
        init = {k: v.clone() for k, v in GPT(run.model).state_dict().items()}

    def make_model() -> nn.Module:
        model = GPT(run.model)
        model.load_state_dict(init)
        return model

    def heldout(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        b = run.batch_size
        ids = list(range(min(n * b, data.num_heldout)))
        return [data.heldout_batch(ids[i : i + b]) for i in range(0, len(ids), b)]

    return Task(
        make_model=make_model,
        loss_fn=gpt_loss,
        batch=data.train_batch,
        num_samples=data.num_train,
        contents=lambda ids: [data.train_batch([i])[0][0] for i in ids],
        heldout=heldout,
    )
