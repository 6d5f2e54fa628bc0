import pytest
import torch

from sparseloco.chunking import ChunkLayout, largest_divisor_at_most


@pytest.mark.parametrize(
    ("n", "limit", "expected"),
    [(4096, 64, 64), (50257, 64, 29), (7, 64, 7), (67, 64, 1), (0, 64, 1)],
)
def test_largest_divisor(n, limit, expected):
    assert largest_divisor_at_most(n, limit) == expected


@pytest.mark.parametrize(
    ("shape", "tiles"),
    [
        ((128, 192), (64, 64)),
        ((100, 30), (50, 30)),
        ((77,), (1, 11)),
        ((), (1, 1)),
        ((8, 4, 3, 3), (8, 36)),
    ],
)
def test_tile_sizes(shape, tiles):
    layout = ChunkLayout.for_shape(shape, 64)
    assert (layout.tile_rows, layout.tile_cols) == tiles
    assert layout.num_chunks * layout.chunk_numel == max(1, torch.Size(shape).numel())


@pytest.mark.parametrize("shape", [(128, 192), (100, 30), (77,), (), (8, 4, 3, 3), (3, 5, 7)])
def test_chunks_round_trip_and_positions_agree(shape):
    x = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
    layout = ChunkLayout.for_shape(shape, 64)
    chunks = layout.to_chunks(x)
    assert chunks.shape == layout.buffer_shape
    assert torch.equal(layout.from_chunks(chunks), x)
    local = torch.arange(layout.chunk_numel).expand(layout.num_chunks, -1)
    # the value at chunk position j is the flat index of that entry in x
    assert torch.equal(layout.flat_positions(local).float(), chunks)


def test_tile_is_a_contiguous_square_of_the_matrix():
    x = torch.arange(128 * 128).reshape(128, 128)
    layout = ChunkLayout.for_shape(x.shape, 64)
    chunk1 = layout.to_chunks(x)[1].reshape(64, 64)
    assert torch.equal(chunk1, x[:64, 64:])


def test_blocks_cover_all_rows_once():
    layout = ChunkLayout.for_shape((640, 128), 64)
    blocks = list(layout.blocks(3 * 64 * 128))
    assert blocks == [(0, 3), (3, 6), (6, 9), (9, 10)]
