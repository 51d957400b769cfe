"""The quant cache on the GPU (pytest -m gpu): the CuPy encoder writes NumPy's bytes, and the decode
kernel (kernels/quant_attention.cu + pk_merge_window) equals its twin packkv.quant.decode_attention_reference
for head_dim 64/128, 2 and 4 bits, groups 32/64/128, GQA groups 1-16, odd lengths, empty sequences and
windows, records in any order, garbage past n_blocks; the launcher refuses clearly."""
import numpy as np
import pytest

from packkv.quant import QuantParams, decode_attention_reference, encode_blocks

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cupy(gpu):
    import cupy
    return cupy


def kv_blocks(rng, n, H, T, D):
    """K with outlier channels, V plain, fp16; one block of fp16 extremes and one constant block."""
    k = rng.standard_normal((n, H, T, D)) * np.where(np.arange(D) % 9 == 0, 30.0, 1.0)
    v = rng.standard_normal((n, H, T, D))
    if n > 2:
        k[1, :, :, :3] = [65504.0, -65504.0, 6e-8]
        v[2] = 0.25
    return k.astype(np.float16), v.astype(np.float16)


@pytest.mark.parametrize("bits,group,H,D", [(2, 32, 8, 128), (4, 64, 3, 64), (2, 128, 2, 64), (4, 32, 1, 128)])
def test_gpu_encoder_writes_numpys_bytes(cupy, bits, group, H, D):
    rng = np.random.default_rng(bits * group + D)
    params = QuantParams(bits, group)
    k, v = kv_blocks(rng, 5, H, group, D)
    want, want_offsets = encode_blocks(k, v, params)
    got, got_offsets = encode_blocks(cupy.asarray(k), cupy.asarray(v), params, cupy)
    assert np.array_equal(got.get(), want) and np.array_equal(got_offsets, want_offsets)


def test_gpu_encoder_names_a_non_finite_token(cupy):
    k, v = kv_blocks(np.random.default_rng(0), 3, 2, 32, 64)
    v[2, 1, 7, 5] = np.inf
    with pytest.raises(ValueError, match="V has a non-finite.*block 2, head 1, token 7"):
        encode_blocks(cupy.asarray(k), cupy.asarray(v), QuantParams(2, 32), cupy)


def decode_case(cupy, rng, params, lengths, H, G, D, windows, W_cap=8, n_splits=None):
    """Records of all sequences in one arena in shuffled order, the kernel against the twin."""
    from packkv.kernels.attention_kernels import quant_decode_attention
    total, T = int(sum(lengths)), params.group
    k, v = kv_blocks(rng, max(total, 1), H, T, D)
    buffer, offsets = encode_blocks(k[:total], v[:total], params)
    size = int(offsets[1] - offsets[0]) if total else 0
    order = rng.permutation(total)
    arena = np.concatenate([buffer.reshape(total, size)[order].reshape(-1), np.zeros(64, np.uint8)])
    where = np.empty(total, np.int64)
    where[order] = np.arange(total) * size
    table = np.full((len(lengths), max(lengths) + 1), 987654321, np.int64)   # garbage past n_blocks
    first = 0
    for b, n in enumerate(lengths):
        table[b, :n] = where[first:first + n]
        first += n
    B = len(lengths)
    q = rng.standard_normal((B, H * G, D)).astype(np.float16)
    wk, wv = (rng.standard_normal((B, H, W_cap, D)).astype(np.float16) for _ in range(2))
    n_blocks, wl = np.asarray(lengths, np.int32), np.asarray(windows, np.int32)
    out = quant_decode_attention(*(cupy.asarray(x) for x in (q, arena, table, n_blocks, wk, wv, wl)), params,
                                 n_splits=n_splits)
    got = out.get().astype(np.float32)
    want = decode_attention_reference(q, arena, table, n_blocks, wk, wv, wl, params)
    assert np.all(np.isfinite(got))
    err = np.abs(got - want)
    assert err.max() <= 1e-2 * max(1.0, float(np.abs(want).max())), \
        f"max err {err.max():.4g} at {np.unravel_index(err.argmax(), err.shape)}"
    return got


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_kernel_matches_twin(cupy, bits, group, D):
    rng = np.random.default_rng(bits + group + D)
    decode_case(cupy, rng, QuantParams(bits, group), [5, 0, 9, 1], H=2, G=4, D=D, windows=[3, 5, 0, 8])


@pytest.mark.parametrize("G", [1, 2, 3, 8, 16])
def test_decode_kernel_group_sizes(cupy, G):
    decode_case(cupy, np.random.default_rng(G), QuantParams(2, 32), [7, 2], H=2, G=G, D=64, windows=[1, 4])


def test_decode_kernel_edge_cases(cupy):
    rng = np.random.default_rng(9)
    got = decode_case(cupy, rng, QuantParams(4, 32), [0, 0], H=1, G=2, D=128, windows=[0, 2])
    assert not got[0].any()                                        # nothing to attend to: zeros
    decode_case(cupy, rng, QuantParams(2, 64), [40, 3], H=2, G=3, D=64, windows=[8, 0], n_splits=1)  # one split
    decode_case(cupy, rng, QuantParams(2, 64), [40, 3], H=2, G=3, D=64, windows=[8, 0], n_splits=37)  # many, empty


def test_decode_launcher_refuses_clearly(cupy):
    from packkv.kernels.attention_kernels import quant_decode_attention
    from packkv.codec import CodecParams
    q = cupy.zeros((1, 4, 96), cupy.float16)
    args = (cupy.zeros(64, cupy.uint8), cupy.zeros((1, 2), cupy.int64), cupy.zeros(1, cupy.int32),
            cupy.zeros((1, 2, 8, 96), cupy.float16), cupy.zeros((1, 2, 8, 96), cupy.float16), cupy.zeros(1, cupy.int32))
    with pytest.raises(ValueError, match="head_dim 96 is not supported"):
        quant_decode_attention(q, *args, QuantParams(2, 32))
    with pytest.raises(ValueError, match="must be a packkv.quant.QuantParams"):
        quant_decode_attention(q, *args, CodecParams())
    q64 = cupy.zeros((1, 3, 64), cupy.float16)
    window = cupy.zeros((1, 3, 8, 64), cupy.float16)           # 192 channels: no groups of 128
    with pytest.raises(ValueError, match="do not tile"):
        quant_decode_attention(q64, args[0], args[1], args[2], window, window, args[5], QuantParams(2, 128))
