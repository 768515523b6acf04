"""The row-slot KV cache: per-row lengths, prefix copies, compaction, growth, and the attention mask."""

import torch

from openk2.model.kv_cache import KVCache


def _cache(rows=3, cap=8, block=4):
    return KVCache(2, {"k": (2,), "v": (1,)}, rows, cap, torch.float32, block=block)


def test_rows_append_at_their_own_length_and_mask_is_per_row_causal():
    c = _cache()
    c.lengths[:] = torch.tensor([0, 3, 5])
    v = c.view(slice(0, 3), 2)
    assert v.S == 7 and not v.uniform
    assert v.positions.tolist() == [[0, 1], [3, 4], [5, 6]]
    # row b's query t sees keys 0..start_b + t
    for b, start in enumerate([0, 3, 5]):
        for t in range(2):
            assert v.mask[b, 0, t].tolist() == [j <= start + t for j in range(7)]
    x = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 2, 2)
    v.write(0, "k", x)
    v.commit()
    assert c.lengths.tolist() == [2, 5, 7]
    assert torch.equal(c.data["k"][0, 1, 3:5], x[1]) and torch.equal(c.data["k"][0, 2, 5:7], x[2])
    assert torch.equal(v.read(0, "k")[0, :2], x[0])


def test_decode_step_writes_one_position_per_row():
    c = _cache()
    c.lengths[:] = torch.tensor([1, 4, 2])
    v = c.view(slice(0, 3), 1)
    v.write(1, "v", torch.tensor([[[1.0]], [[2.0]], [[3.0]]]))
    v.commit()
    assert [float(c.data["v"][1, r, p]) for r, p in ((0, 1), (1, 4), (2, 2))] == [1.0, 2.0, 3.0]
    assert c.lengths.tolist() == [2, 5, 3]


def test_uniform_rows_from_zero_need_no_mask():
    c = _cache()
    v = c.view(slice(0, 2), 5)
    assert v.causal and v.mask is None and v.S == 5


def test_capacity_grows_in_blocks_keeps_data_and_trims_back():
    c = _cache(cap=4, block=4)
    c.data["k"][:, 0, :4] = 7.0
    c.lengths[0] = 4
    c.view(0, 6).commit()  # 10 positions needed: 12 after rounding up to the block
    assert c.capacity == 12 and float(c.data["k"][0, 0, 3, 0]) == 7.0
    c.reset_row(0)
    c.lengths[1] = 2
    c.trim()
    assert c.capacity == 8  # longest row 2 + one block of headroom, in blocks


def test_copy_prefix_move_row_snapshot_store():
    c = _cache()
    c.data["k"][:, 0, :5] = torch.randn(2, 5, 2)
    c.lengths[0] = 5
    c.copy_prefix(0, [1, 2], 3)
    assert c.lengths.tolist() == [5, 3, 3] and torch.equal(c.data["k"][:, 2, :3], c.data["k"][:, 0, :3])
    snap = c.snapshot(0, 5)
    c.move_row(0, 1)
    assert c.lengths.tolist() == [0, 5, 3] and torch.equal(c.data["k"][:, 1, :5], snap["k"])
    c.store(snap, 2)
    assert c.lengths[2] == 5 and torch.equal(c.data["k"][:, 2, :5], snap["k"])


def test_full_cache_names_the_limit():
    c = KVCache(1, {"k": (1,)}, 1, 4, torch.float32, block=4, max_capacity=8)
    try:
        c.view(0, 9)
    except ValueError as e:
        assert "9" in str(e) and "8" in str(e)
    else:
        raise AssertionError("expected a full-cache error")
