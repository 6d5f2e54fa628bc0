"""Shared fixtures: a moto S3 server on loopback, storages, a tiny model and its payloads."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch

from netcomm import (
    Ed25519Signer,
    LocalStorage,
    ModelSpec,
    S3Config,
    S3Storage,
)
from sparseloco import CodecConfig, ErrorFeedback, encode
from sparseloco.payload import DenseUpdate

_bucket_ids = itertools.count()


def s3_config(endpoint: str, bucket: str, **overrides) -> S3Config:
    fields = dict(
        bucket=bucket,
        endpoint_url=endpoint,
        access_key_id="testing",
        secret_access_key="testing",
        connect_timeout_s=2.0,
        read_timeout_s=5.0,
        max_attempts=3,
        backoff_s=0.01,
        backoff_max_s=0.05,
    )
    fields.update(overrides)
    return S3Config(**fields)


@pytest.fixture
def s3_factory(moto_url: str) -> Iterator[Callable[..., S3Storage]]:
    """Builds S3Storage objects on a fresh bucket per test (shared across calls in a test)."""
    bucket = f"bucket-{next(_bucket_ids)}"
    made: list[S3Storage] = []

    def make(endpoint: str | None = None, **overrides) -> S3Storage:
        storage = S3Storage(s3_config(endpoint or moto_url, bucket, **overrides))
        if not made:
            S3Storage(s3_config(moto_url, bucket)).create_bucket()
        made.append(storage)
        return storage

    yield make
    for storage in made:
        storage.close()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_factory):
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    return s3_factory()


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))


@pytest.fixture
def model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture
def spec(model) -> ModelSpec:
    return ModelSpec.from_module(model)


CODEC = CodecConfig()


def sparse_update(model: torch.nn.Module, seed: int = 1):
    """A real SparseLoCo-encoded update of random pseudo-gradients for ``model``."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    return encode(deltas, ErrorFeedback(CODEC))


def dense_update(model: torch.nn.Module, seed: int = 1) -> DenseUpdate:
    gen = torch.Generator().manual_seed(seed)
    return DenseUpdate(
        {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    )


def payload_bytes(payload) -> dict[str, bytes]:
    """A payload's tensors as raw bytes, for exact equality checks."""
    tensors, _ = payload.to_tensors()
    return {k: v.contiguous().view(torch.uint8).numpy().tobytes() for k, v in tensors.items()}


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer.from_seed(bytes(range(32)))


@pytest.fixture
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (importlib mode cannot import conftest directly)."""
    return SimpleNamespace(
        codec=CODEC,
        tiny_model=tiny_model,
        sparse_update=sparse_update,
        dense_update=dense_update,
        payload_bytes=payload_bytes,
        s3_config=s3_config,
    )
