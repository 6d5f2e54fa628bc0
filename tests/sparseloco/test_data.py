"""Data loading on small generated files: text, uint16 shards, npy shards, bad input."""

import numpy as np
import pytest
import torch

from sparseloco.data import TokenDataset, load_tokens, stdlib_corpus
from sparseloco.errors import ConfigError
from sparseloco.models import GPT, GPTConfig


def test_text_folder_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("world")
    (tmp_path / "a.txt").write_text("hello ")
    (tmp_path / "skip.bin.tmp").write_bytes(b"\x00" * 3)
    tokens = load_tokens(tmp_path)
    assert bytes(tokens.astype(np.uint8)) == b"hello world"


def test_token_shards_bin_and_npy(tmp_path):
    np.arange(1000, 1010, dtype="<u2").tofile(tmp_path / "shard_000.bin")
    np.save(tmp_path / "shard_001.npy", np.arange(5, dtype=np.int32))
    tokens = load_tokens(tmp_path)
    assert tokens.tolist() == [*range(1000, 1010), 0, 1, 2, 3, 4]
    assert load_tokens(tmp_path, max_tokens=4).tolist() == [1000, 1001, 1002, 1003]


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(ConfigError, match="no files"):
        load_tokens(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(ConfigError, match="1-D integer"):
        load_tokens(tmp_path)
    with pytest.raises(ConfigError, match="too few"):
        TokenDataset(np.arange(10), block_size=8)


def test_dataset_samples_are_shifted_windows_and_ids_checked():
    ds = TokenDataset(np.arange(1000) % 256, block_size=8, heldout_fraction=0.1)
    x, y = ds.train_batch([0, 3])
    assert x[1].tolist() == list(range(24, 32))
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert ds.heldout_batch([0])[0][0, 0].item() == 900 % 256
    with pytest.raises(ConfigError, match="out of range"):
        ds.train_batch([ds.num_train])


def test_stdlib_corpus_is_deterministic_and_bounded():
    a, b = stdlib_corpus(50_000), stdlib_corpus(50_000)
    assert len(a) == 50_000 and np.array_equal(a, b)
    assert b"import" in bytes(a)


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16),
        GPTConfig(
            block_size=16, n_layer=1, n_head=4, n_embd=16, n_kv_head=2, pos="rope", norm="rmsnorm"
        ),
    ],
)
def test_gpt_shapes_and_loss_at_init(cfg):
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 256, (3, 16), generator=g)
    targets = torch.randint(0, 256, (3, 16), generator=g)  # independent of the inputs
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 256)
    assert abs(float(loss.detach()) - np.log(256)) < 0.1  # near-uniform predictions at init
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_config_validation():
    with pytest.raises(ConfigError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_kv_head": 0}, "n_kv_head must be a positive integer or None"),
        ({"n_kv_head": -2}, "n_kv_head must be a positive integer or None"),
        ({"n_layer": True}, "n_layer must be a positive integer"),
        ({"mlp_ratio": float("inf")}, "mlp_ratio must be finite"),
        ({"mlp_ratio": -1.0}, "mlp_ratio must be finite"),
        ({"mlp_ratio": float("nan")}, "mlp_ratio must be finite"),
        ({"mlp_ratio": "4"}, "mlp_ratio must be a number"),
        ({"mlp_ratio": 1e308}, "mlp_ratio must be finite, > 0 and <= 64"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"tie_weights": "yes"}, "tie_weights must be true or false"),
    ],
)
def test_gpt_config_rejects_hostile_json_values(fields, message):
    """A --model-config file is user input: every bad value is a ConfigError, not a crash."""
    with pytest.raises(ConfigError, match=message):
        GPTConfig.from_dict({"n_embd": 64, "n_head": 4, **fields})


def test_gpt_config_from_a_json_that_is_not_an_object():
    with pytest.raises(ConfigError, match="mapping of fields, got list"):
        GPTConfig.from_dict(["n_layer"])  # type: ignore[arg-type]


def test_binary_files_are_refused_but_text_is_read(tmp_path):
    elf = tmp_path / "prog"
    elf.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(64))
    with pytest.raises(ConfigError, match="NUL bytes"):
        load_tokens(elf)
    latin1 = tmp_path / "old.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(ConfigError, match="invalid UTF-8"):
        load_tokens(latin1)
    # a multi-byte character cut by the 64 KiB sample's end is still text
    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * 65535 + "é".encode() * 10)
    assert load_tokens(big).size == 65535 + 20
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokens(tmp_path / "missing")
