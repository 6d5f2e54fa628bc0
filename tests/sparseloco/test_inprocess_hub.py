"""InProcessHub never silently leaves a peer out: it waits for the listed peers, or refuses a
peer that connects after gathering began."""

import pytest
import torch

from sparseloco import InProcessHub
from sparseloco.errors import ExchangeError
from sparseloco.payload import DenseUpdate


def _update() -> DenseUpdate:
    return DenseUpdate({"w": torch.ones(2)})


def test_a_late_connect_raises_without_a_peer_list():
    hub = InProcessHub(timeout=0.1)
    a = hub.connect("a")
    a.publish(0, _update())
    assert a.gather(0).statuses == {}
    with pytest.raises(ExchangeError, match="connects after the first gather"):
        hub.connect("b")


def test_with_a_peer_list_gather_waits_for_a_late_peer():
    hub = InProcessHub(["a", "b"], timeout=0.2)
    a = hub.connect("a")
    first = a.gather(0)
    assert first.statuses["b"].status == "missing"
    b = hub.connect("b")
    b.publish(1, _update())
    assert a.gather(1).statuses["b"].status == "ok"
