"""Token grouping: permutation, padding, tile lists, density."""

import math

import pytest
import torch

from hasten.kernels.grouping import default_tile, group_layout


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("grid,group", [((1, 5, 7), (1, 2, 2)), ((3, 4, 5), (2, 3, 2)), ((1, 1, 1), (1, 16, 16))])
def test_permutation_round_trips_and_pads(grid, group, text_first):
    layout = group_layout(grid, group, num_text=3, text_first=text_first, pattern="block", window=(1, 1, 1))
    seq = layout.seq_len
    assert seq == 3 + math.prod(grid)
    # gather(scatter(x)) == x for every model position; padding slots are invalid keys.
    assert torch.equal(layout.gather_index[layout.scatter_index], torch.arange(seq))
    assert int(layout.key_valid.sum()) == seq
    assert layout.kernel_len % layout.tile == 0
    text_positions = torch.arange(3) if text_first else torch.arange(seq - 3, seq)
    assert torch.equal(layout.scatter_index[text_positions], torch.arange(3))
    assert not layout.image_key_valid[: layout.text_slots].any()


def test_groups_are_contiguous_in_kernel_order():
    layout = group_layout((1, 5, 7), (1, 2, 3), num_text=0, tile=16)
    slots = layout.scatter_index.view(5, 7)
    for gh in range(3):
        for gw in range(3):
            block = slots[gh * 2 : gh * 2 + 2, gw * 3 : gw * 3 + 3].flatten()
            # One group = one tile (6 tokens padded to 16), its tokens in row-major order.
            assert torch.equal(block, torch.arange(len(block)) + block[0])
            assert int(block[0]) % 16 == 0


@pytest.mark.parametrize("resolution,cross,block", [(2048, 0.234, 0.118), (4096, 0.121, 0.033), (8192, 0.062, 0.009)])
def test_image_density_matches_paper(resolution, cross, block):
    # Flux latent grid = resolution / 16 per side, 16x16 groups (research note: 23%, 12%, 6.2% GRAT-X).
    grid = (1, resolution // 16, resolution // 16)
    assert group_layout(grid, (1, 16, 16), pattern="cross").density == pytest.approx(cross, abs=1e-3)
    assert group_layout(grid, (1, 16, 16), pattern="block", window=(1, 1, 1)).density == pytest.approx(block, abs=1e-3)


def test_video_cross_density_formula():
    # Sharing any of (t, h, w) with an (nT, nH, nW) group grid: 1 - prod(1 - 1/n).
    layout = group_layout((8, 24, 40), (4, 8, 8), pattern="cross")
    assert layout.group_grid == (2, 3, 5)
    assert layout.density == pytest.approx(1 - (1 / 2) * (2 / 3) * (4 / 5))


def test_text_rows_attend_everything_and_image_rows_all_text():
    layout = group_layout((1, 8, 8), (1, 4, 4), num_text=20, pattern="cross", tile=16)
    text_tiles = layout.text_slots // layout.tile
    assert text_tiles == 2
    mask = layout.dense_mask()
    assert mask[: layout.num_text].sum(1).eq(layout.seq_len).all()
    assert mask[layout.text_slots :, : layout.num_text].all()


def test_grid_smaller_than_one_group_is_one_partial_group():
    layout = group_layout((1, 3, 2), (1, 16, 16), num_text=0, pattern="block", window=(1, 1, 1))
    assert layout.group_grid == (1, 1, 1) and layout.num_tiles == 1 and layout.density == 1.0


def test_default_tile():
    assert [default_tile(n) for n in (1, 6, 16, 17, 64, 256, 1000)] == [16, 16, 16, 32, 64, 128, 128]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(grid=(1, 4, 4), group=(1, 0, 2)), "group_size"),
        (dict(grid=(1, 4, 4), group=(1, 2, 2), pattern="diagonal"), "pattern"),
        (dict(grid=(1, 4, 4), group=(1, 2, 2), window=(1, -1, 1)), "window"),
        (dict(grid=(1, 4, 4), group=(1, 2, 2), tile=48), "tile"),
        (dict(grid=(0, 4, 4), group=(1, 2, 2)), "grid"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_layout(**kwargs)


def test_partial_groups_take_only_the_tiles_they_need():
    # 34 rows in groups of 8: four full groups and one of 2 rows. Full groups (4x8x8 = 256 tokens)
    # take 2 tiles of 128, the partial ones (4x2x8 = 64 tokens) 1 tile.
    layout = group_layout((4, 34, 8), (4, 8, 8), num_text=0, tile=128)
    assert layout.kernel_len == 4 * 256 + 128
    assert layout.relative_work == pytest.approx(float(layout.kv_counts.sum()) * 128**2 / (4 * 34 * 8) ** 2)
    exact = group_layout((1, 32, 32), (1, 16, 16), num_text=0)
    assert exact.bound == pytest.approx(1 / exact.density)  # no padding: bound = 1/density
