"""The fused kernel's launch geometry on the host (kernels/attention_kernels.py, no GPU): shared memory per
CTA for the CTAs per SM each split kernel is built for, the splits (one wave, every warp of a CTA the same
whole number of items), the staging-slot switch and its template instances. The kernels' own tests are
tests/test_kernels_gpu.py; the host constants are checked against the device macros by
tests/test_kernels_compile.py."""
import pytest

from packkv import codec
from packkv.kernels import attention_kernels as ak

H100_SMS = 132


@pytest.fixture
def h100(monkeypatch):
    monkeypatch.setattr(ak, "multiprocessors", lambda: H100_SMS)


def fits(shared: int, ctas: int) -> bool:
    return ctas * (shared + 1024) <= ak.SMEM_PER_SM      # 1 KB of each CTA's shared memory is the system's


@pytest.mark.parametrize("D", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("T,P", [(16, 16), (64, 16), (64, 8), (128, 32), (256, 16)])
def test_each_kernel_fits_the_ctas_per_sm_it_is_built_for(D, T, P):
    for slots in (1, 2):
        slot = ak.default_slot_bytes(T, D, P, 0, slots=slots)
        assert fits(ak._shared_bytes(slot, D, 0, slots=slots), ak.CTAS_PER_SM[slots])
    for mode in (1, 2):
        slot = ak.default_slot_bytes(T, D, P, mode)
        assert fits(ak._shared_bytes(slot, D, mode), ak.GEMV_CTAS_PER_SM)
    slot = ak.default_slot_bytes(T, D, P, 0, tiles=True)
    assert fits(ak._shared_bytes(slot, D, 0, tiles=True), ak.TILE_CTAS_PER_SM)


def test_one_slot_per_warp_at_three_ctas_holds_a_real_item_of_the_8b_shape():
    """The 8B shape (D=128, defaults): 76.8 KB per CTA; the one slot (10,096 B) is larger than each of the
    two at 2 CTAs per SM, and holds an item of the real K/V (421 B per token and layer over 8 KV heads:
    ~6.7 KB of one head's 128 tokens, plus the token sections of its two blocks, ~0.9 KB)."""
    one, two = (ak.default_slot_bytes(64, 128, 16, 0, slots=n) for n in (1, 2))
    assert ak._shared_bytes(one, 128, 0, slots=1) == 76800
    assert one == 10096 and two == 9808
    assert one >= 421 * 128 // 8 + 2 * (8 + 6 * 64 + 32)
    assert ak.default_slot_bytes(64, 128, 16, 0) == one              # slots=1 unless told


def test_one_slot_only_where_its_grid_holds_more_than_two_ctas_per_sm(h100, monkeypatch):
    """The 8B shape: 32K x 1 gives 32 splits x 8 KV heads = 256 one-slot CTAs, no more than the 264 places
    of 2 per SM: two slots; 128K x 1 (43 x 8 = 344) and 32K x 8 (6 x 64 = 384): one. Given slots and
    ITEM_SLOTS come first; anything but 1 or 2 is refused."""
    assert ak.item_slots(None, 1, 8, 4, 32768 // 64, 64) == 2
    assert ak.item_slots(None, 1, 8, 4, 131072 // 64, 64) == 1
    assert ak.item_slots(None, 8, 8, 4, 32768 // 64, 64) == 1
    assert ak.attention_splits(1, 8, 4, 32768 // 64, 64, False) == ak.attention_splits(1, 8, 4, 512, 64, False, 2)
    assert ak.item_slots(2, 8, 8, 4, 512, 64) == 2
    monkeypatch.setattr(ak, "ITEM_SLOTS", 2)
    assert ak.item_slots(None, 8, 8, 4, 512, 64) == 2
    for bad in (0, 3, True, "1"):
        with pytest.raises(ValueError, match="slots must be one of"):
            ak.item_slots(bad, 1, 8, 4, 512, 64)


def test_splits_give_every_warp_a_whole_number_of_items_in_one_wave(h100):
    """The study's numbers: the 8B shape at 128K x 1 gets 43 splits of 24 items (6 per warp) with one slot
    (3 CTAs per SM), 32 of 32 (8 per warp) with two; at 32K x 8, 6 splits of 11 per warp, 4 of 16."""
    items = lambda blocks: -(-blocks // ak.blocks_per_item(64))
    assert ak.attention_splits(1, 8, 4, 2048, 64, False) == 43
    assert ak.attention_splits(1, 8, 4, 2048, 64, False, slots=2) == 32
    assert ak.attention_splits(8, 8, 4, 512, 64, False) == 6
    assert ak.attention_splits(8, 8, 4, 512, 64, False, slots=2) == 4
    for batch, kv_heads, group, blocks in [(1, 8, 4, 2048), (8, 8, 4, 512), (1, 3, 3, 2047), (2, 8, 4, 999),
                                           (1, 1, 1, 5), (4, 3, 3, 100), (1, 8, 32, 4096)]:
        for slots in (1, 2):
            n = ak.attention_splits(batch, kv_heads, group, blocks, 64, False, slots)
            per_split = -(-items(blocks) // n)
            ctas = n * ak._ctas_per_split(batch, kv_heads, group)
            wanted = max(1, ak.CTAS_PER_SM[slots] * H100_SMS // ak._ctas_per_split(batch, kv_heads, group))
            best = -(-(-(-items(blocks) // wanted)) // ak.WARPS)   # fewest items of the longest warp in one wave
            assert n <= wanted and (ctas <= ak.CTAS_PER_SM[slots] * H100_SMS or n == 1)
            assert -(-per_split // ak.WARPS) == best
            assert n == 1 or -(-items(blocks) // (n - 1)) > best * ak.WARPS   # the fewest splits that do it


def test_tile_mode_splits_are_the_splits_that_hold_items(h100):
    """Tile mode: one item per split at least; no split left empty by the rounding."""
    for blocks in (1, 64, 128, 200, 1000):
        n = ak.attention_splits(1, 3, 3, blocks, 64, True)
        per_split = -(-ak._items(blocks, 64) // n)
        assert (n - 1) * per_split < ak._items(blocks, 64) <= n * per_split


def test_the_crossover_to_tile_mode_counts_the_warps_of_the_item_mode_in_use(h100):
    """About one item per warp of a full item-mode grid: 3 CTAs per SM with one slot, 2 with two."""
    assert ak.tile_mode(1, 8, 4, 128, 24576 // 64, 64)                # 1536 warp-items <= 12 x 132 warps
    assert not ak.tile_mode(1, 8, 4, 128, 24576 // 64, 64, slots=2)   # > 8 x 132
    assert not ak.tile_mode(1, 8, 4, 128, 32768 // 64, 64)


def test_slots_name_their_instance_and_are_checked_before_the_gpu():
    assert ak.module_names("packkv_attention.cu", 128, 16, slots=2) == ("pk_attention_splits<128, 16, false, 2>",
                                                                        "pk_merge_window<128>")
    assert ak.split_kernel_name("pk_attention_splits", 64, 8, True, 2) == "pk_attention_splits<64, 8, true, 2>"
    assert ak.module_names("packkv_attention.cu", 128, 16)[:2] == ("pk_attention_splits<128, 16>",
                                                                   "pk_attention_tiles<128, 16>")
    with pytest.raises(ValueError, match="no slots parameter"):
        ak.split_kernel_name("pk_attention_tiles", 128, 16, False, 2)
    for bad in (0, 3, True, "1"):
        with pytest.raises(ValueError, match="slots must be one of"):
            ak.compressed_decode_attention(None, None, None, None, None, None, None, codec.CodecParams(), slots=bad)
