"""GPU kernels of the forward pass (kernels/model_ops.cu, kernels/dense_attention.cu) against their
NumPy twins: the CPU path of model/llama.py, the dense cache's slice assignment, causal_attention."""
import numpy as np
import pytest

from packkv.attention import causal_attention, causal_mask
from packkv.backend import get_backend
from packkv.cache import CacheShape, DenseCache
from packkv.model import Llama, LlamaConfig
from packkv.weights import expected_tensors

pytestmark = pytest.mark.gpu

CONFIG = LlamaConfig(vocab_size=64, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                     rope_theta=500.0)


@pytest.fixture(scope="module")
def models(gpu):
    rng = np.random.default_rng(0)
    tensors = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in expected_tensors(CONFIG).items()}
    return Llama(CONFIG, tensors, get_backend("cpu")), Llama(CONFIG, tensors, gpu)


def test_rms_norm(models):
    cpu_model, gpu_model = models
    import cupy
    x = (np.random.default_rng(1).standard_normal((3, 5, 96)) * 4).astype(np.float32)
    w = cpu_model.layers[0].attn_norm
    want = cpu_model.rms_norm(x, w)
    got = gpu_model.rms_norm(cupy.asarray(x), cupy.asarray(w)).get()
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_rope_split_at_each_sequence_position(models):
    cpu_model, gpu_model = models
    import cupy
    B, T = 3, 4
    qkv = np.random.default_rng(2).standard_normal((B, T, (6 + 4) * 32)).astype(np.float16)
    shape = CacheShape(2, 2, 32, B, 128)
    cpu_cache, gpu_cache = DenseCache(shape, get_backend("cpu")), DenseCache(shape, gpu_model.backend)
    for cache in (cpu_cache, gpu_cache):
        cache.lengths[:] = [0, 17, 100]
        cache.starts[...] = cache.backend.xp.asarray(cache.lengths.astype(np.int32))
    want = cpu_model.split_heads_rope(qkv.astype(np.float32), cpu_cache)
    got = gpu_model.split_heads_rope(cupy.asarray(qkv), gpu_cache)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.get().astype(np.float32), w, rtol=2e-3, atol=2e-3)


def test_silu_mul(models):
    import cupy
    from packkv.kernels import model_ops
    gate_up = np.random.default_rng(3).standard_normal((2, 3, 2 * 160)).astype(np.float16)
    g, u = gate_up[..., :160].astype(np.float32), gate_up[..., 160:].astype(np.float32)
    want = g / (1 + np.exp(-g)) * u
    got = model_ops.silu_mul(cupy.asarray(gate_up)).get()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_append_kv_writes_at_each_sequence_offset(gpu):
    import cupy
    from packkv.kernels import model_ops
    rng = np.random.default_rng(4)
    cache = np.zeros((2, 3, 2, 40, 16), np.float16)                 # [layers, B, Hkv, capacity, D]
    k = rng.standard_normal((3, 2, 5, 16)).astype(np.float16)
    v = rng.standard_normal((3, 2, 5, 16)).astype(np.float16)
    starts = np.array([0, 7, 35], np.int32)
    ck, cv = cupy.asarray(cache), cupy.asarray(cache)
    model_ops.append_kv(cupy.asarray(k), cupy.asarray(v), ck[1], cv[1], cupy.asarray(starts))
    want_k, want_v = cache.copy(), cache.copy()
    for b, s in enumerate(starts):
        want_k[1, b, :, s:s + 5], want_v[1, b, :, s:s + 5] = k[b], v[b]
    np.testing.assert_array_equal(ck.get(), want_k)
    np.testing.assert_array_equal(cv.get(), want_v)


def test_rope_split_into_cache_equals_rope_split_then_append(gpu):
    """RoPE at each sequence's position (start) and k, v written at another offset per sequence
    (write_start: a block cache's window), into a layer slice whose batch stride spans the layers."""
    import cupy
    from packkv.kernels import model_ops
    rng = np.random.default_rng(6)
    B, T, Hq, Hkv, D, capacity = 3, 2, 6, 2, 32, 40
    qkv = cupy.asarray(rng.standard_normal((B, T, (Hq + 2 * Hkv) * D)).astype(np.float16))
    start, write_start = cupy.asarray(np.array([0, 9, 70], np.int32)), cupy.asarray(np.array([0, 5, 38], np.int32))
    angles = np.arange(128)[:, None] / 10.0 ** (np.arange(D // 2)[None, :] / 8)
    cos, sin = cupy.asarray(np.cos(angles).astype(np.float32)), cupy.asarray(np.sin(angles).astype(np.float32))
    want_k = cupy.asarray(rng.standard_normal((B, 2, Hkv, capacity, D)).astype(np.float16))  # [B, layers, ...]
    want_v, got_k = want_k * 2, want_k.copy()
    got_v = want_v.copy()
    q, k, v = model_ops.rope_split(qkv, start, cos, sin, Hq, Hkv, D)
    model_ops.append_kv(k, v, want_k[:, 1], want_v[:, 1], write_start)
    got_q = model_ops.rope_split_into_cache(qkv, start, cos, sin, Hq, Hkv, D, got_k[:, 1], got_v[:, 1], write_start)
    np.testing.assert_array_equal(got_q.get(), q.get())
    np.testing.assert_array_equal(got_k.get(), want_k.get())
    np.testing.assert_array_equal(got_v.get(), want_v.get())
    with pytest.raises(ValueError, match="do not fit"):
        model_ops.rope_split_into_cache(qkv, start, cos, sin, Hq, Hkv, D, got_k[:2, 1], got_v[:2, 1], write_start)


@pytest.mark.parametrize("group, head_dim", [(1, 64), (3, 64), (4, 128), (8, 128), (2, 256)])
@pytest.mark.parametrize("splits", [None, 1, 7, 500])
def test_dense_decode_attention_matches_reference(gpu, group, head_dim, splits):
    import cupy
    from packkv.kernels.dense_attention import dense_decode_attention
    rng = np.random.default_rng(group * head_dim)
    B, Hkv, capacity = 3, 2, 700
    lengths = np.array([1, 333, 700])
    k = (rng.standard_normal((B, Hkv, capacity, head_dim)) * 2).astype(np.float16)
    v = rng.standard_normal((B, Hkv, capacity, head_dim)).astype(np.float16)
    q = rng.standard_normal((B, Hkv * group, 1, head_dim)).astype(np.float16)
    want = np.concatenate([causal_attention(np, q[b:b + 1].astype(np.float32),
                                            k[b:b + 1, :, :n].astype(np.float32),
                                            v[b:b + 1, :, :n].astype(np.float32), causal_mask(np, [n], 1, n))
                           for b, n in enumerate(lengths)])[:, :, 0]
    starts = cupy.asarray((lengths - 1).astype(np.int32))
    got = dense_decode_attention(cupy.asarray(q[:, :, 0]), cupy.asarray(k), cupy.asarray(v), starts, extra=1,
                           splits=splits).get()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=3e-3, atol=3e-3)


def test_dense_decode_attention_refuses_bad_input(gpu):
    import cupy
    from packkv.kernels.dense_attention import dense_decode_attention
    q = cupy.zeros((1, 4, 64), np.float16)
    k = cupy.zeros((1, 2, 10, 64), np.float16)
    with pytest.raises(ValueError, match="q must be a 3-d fp16"):
        dense_decode_attention(q.astype(np.float32), k, k, cupy.zeros(1, np.int32))
    with pytest.raises(ValueError, match="starts must be an int32"):
        dense_decode_attention(q, k, k, cupy.zeros(1, np.int64))
    with pytest.raises(ValueError, match="does not fit"):
        dense_decode_attention(cupy.zeros((1, 4, 32), np.float16), k, k, cupy.zeros(1, np.int32))


def test_gpu_forward_matches_cpu_on_a_tiny_model(models):
    cpu_model, gpu_model = models
    tokens = np.random.default_rng(5).integers(0, 64, (2, 9))
    shape = CacheShape(2, 2, 32, 2, 64)
    outs = []
    for model in models:
        cache = DenseCache(shape, model.backend)
        logits = [model.backend.to_numpy(model.forward(tokens[:, :6], cache, all_logits=True))]
        logits += [model.backend.to_numpy(model.forward(tokens[:, t:t + 1], cache)) for t in range(6, 9)]
        outs.append(np.concatenate(logits, axis=1))
    scale = np.abs(outs[0]).max()
    assert np.abs(outs[1] - outs[0]).max() < 0.02 * scale


KERNEL_ROWS = [("warp", 1), ("warp", 3), ("warp", 8), ("mma", 1), ("mma", 3), ("mma", 8), ("mma", 11), ("mma", 16)]


@pytest.mark.parametrize("kernel, rows", KERNEL_ROWS)
@pytest.mark.parametrize("in_features, out_features", [(576, 1536), (64, 5), (4096, 96), (200, 33), (4104, 40)])
def test_linear_rows_matches_matmul(gpu, kernel, rows, in_features, out_features):
    import cupy
    from packkv.kernels import model_ops
    rng = np.random.default_rng(rows * in_features)
    x = rng.standard_normal((rows, in_features)).astype(np.float16)
    w = (rng.standard_normal((out_features, in_features)) / np.sqrt(in_features)).astype(np.float16)
    bias = rng.standard_normal(out_features).astype(np.float32)
    want = x.astype(np.float32) @ w.astype(np.float32).T + bias
    got = model_ops.linear_rows(cupy.asarray(x), cupy.asarray(w), cupy.asarray(bias), kernel=kernel).get()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("kernel, rows", [("warp", 1), ("warp", 5), ("mma", 5), ("mma", 13)])
def test_linear_rows_adds_into_the_residual_stream(gpu, kernel, rows):
    import cupy
    from packkv.kernels import model_ops
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 1, 200)).astype(np.float16)
    w = (rng.standard_normal((96, 200)) / np.sqrt(200)).astype(np.float16)
    residual = rng.standard_normal((rows, 1, 96)).astype(np.float32)
    want = residual + x.astype(np.float32) @ w.astype(np.float32).T
    on_gpu = cupy.asarray(residual)
    got = model_ops.linear_rows(cupy.asarray(x), cupy.asarray(w), residual=on_gpu, kernel=kernel)
    assert got is on_gpu
    np.testing.assert_allclose(on_gpu.get(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kernel, rows", [("warp", 3), ("mma", 3), ("mma", 16)])
def test_linear_rows_swiglu_is_silu_of_gate_times_up(gpu, bias, kernel, rows):
    import cupy
    from packkv.kernels import model_ops
    rng = np.random.default_rng(7)
    x = rng.standard_normal((rows, 576)).astype(np.float16)
    w = (rng.standard_normal((2 * 160, 576)) / np.sqrt(576)).astype(np.float16)
    b = rng.standard_normal(2 * 160).astype(np.float32) if bias else None
    gate_up = x.astype(np.float32) @ w.astype(np.float32).T + (b if bias else 0)
    gate, up = gate_up[:, :160], gate_up[:, 160:]
    want = gate / (1 + np.exp(-gate)) * up
    got = model_ops.linear_rows(cupy.asarray(x), cupy.asarray(w), None if b is None else cupy.asarray(b),
                                swiglu=True, kernel=kernel).get()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=5e-3, atol=5e-3)


# (mma, 16, 2048): 64 KB of normalised rows, past 48 KB alone; (mma, 8, 2048): 32 KB, past it only with the
# kernel's static shared memory (the warps' partial tiles): both need the opt-in
@pytest.mark.parametrize("kernel, rows, hidden", [("warp", 1, 96), ("warp", 4, 96), ("mma", 4, 96), ("mma", 16, 96),
                                                  ("mma", 16, 2048), ("mma", 8, 2048)])
def test_linear_rows_normalises_its_input_like_rms_norm(models, kernel, rows, hidden):
    cpu_model, _ = models
    import cupy
    from packkv.kernels import model_ops
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 1, hidden)) * 3).astype(np.float32)
    norm_w = (1 + rng.standard_normal(hidden) / 4).astype(np.float32)
    w = (rng.standard_normal((2 * 40, hidden)) / np.sqrt(hidden)).astype(np.float16)
    h = cpu_model.rms_norm(x, norm_w).astype(np.float16).astype(np.float32)
    want = h @ w.astype(np.float32).T
    got = model_ops.linear_rows(cupy.asarray(x), cupy.asarray(w), norm_weight=cupy.asarray(norm_w),
                                eps=CONFIG.rms_norm_eps, kernel=kernel).get()
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=5e-3, atol=5e-3)
    gate, up = want[..., :40], want[..., 40:]
    got = model_ops.linear_rows(cupy.asarray(x), cupy.asarray(w), norm_weight=cupy.asarray(norm_w),
                                eps=CONFIG.rms_norm_eps, swiglu=True, kernel=kernel).get()
    np.testing.assert_allclose(got.astype(np.float32), gate / (1 + np.exp(-gate)) * up, rtol=5e-3, atol=5e-3)


def test_linear_rows_refuses_too_many_rows(gpu):
    import cupy
    from packkv.kernels import model_ops
    with pytest.raises(ValueError, match="1..16 rows"):
        model_ops.linear_rows(cupy.zeros((17, 64), np.float16), cupy.zeros((4, 64), np.float16))
    with pytest.raises(ValueError, match="up to 8 rows"):
        model_ops.linear_rows(cupy.zeros((9, 64), np.float16), cupy.zeros((4, 64), np.float16), kernel="warp")


def test_argmax_rows_is_numpys_argmax(gpu):
    """Ties go to the first index, NaN beats everything, an all -inf row gives 0; strided rows."""
    import cupy
    from packkv.kernels import model_ops
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((6, 3, 5000)).astype(np.float32)
    logits[1, 2, [7, 4000]] = 50.0                      # a tie
    logits[2, 2, :] = -np.inf
    logits[3, 2, [9, 99]] = np.nan
    logits[4, 2, :] = 1.0                               # all equal
    logits[5, 2, 4999] = 80.0                           # the last element
    ids = cupy.full(6, -7, dtype=np.int32)
    model_ops.argmax_rows(cupy.asarray(logits)[:, 2], out=ids)
    np.testing.assert_array_equal(ids.get(), np.argmax(logits[:, 2], axis=-1))
    with pytest.raises(ValueError, match="one id per row"):
        model_ops.argmax_rows(cupy.asarray(logits)[:, 2], out=cupy.zeros(5, dtype=np.int32))
    with pytest.raises(ValueError, match="fp32"):
        model_ops.argmax_rows(cupy.asarray(logits).astype(np.float16)[:, 2], out=ids)


def test_add_one(gpu):
    import cupy
    from packkv.kernels import model_ops
    counters = cupy.asarray(np.arange(300, dtype=np.int32))
    model_ops.add_one(counters)
    np.testing.assert_array_equal(counters.get(), np.arange(300) + 1)


@pytest.mark.parametrize("kernel", ["warp", "mma"])
@pytest.mark.parametrize("pdl", [True, False])
def test_a_captured_chain_of_dependent_kernels_equals_eager_launches(gpu, kernel, pdl, monkeypatch):
    """Each kernel reads what the previous one wrote (the residual stream, normalised; its product):
    captured as programmatic dependent launches (launch.py), a kernel that read too early would
    see a stale stream and the chain would diverge from the eager one."""
    import cupy
    from packkv.kernels import launch
    from packkv.kernels.model_ops import linear_rows
    monkeypatch.setattr(launch, "PDL", pdl)
    extended_launches = []
    driver = launch._libcuda()

    class CountingDriver:                          # counts the programmatic dependent launches
        def cuLaunchKernelEx(self, *args):
            extended_launches.append(1)
            return driver.cuLaunchKernelEx(*args)
    monkeypatch.setattr(launch, "_libcuda", lambda: CountingDriver())
    rng = np.random.default_rng(11)
    hidden, rows, steps = 576, 2, 24
    weights = [cupy.asarray(rng.standard_normal((hidden, hidden)) * 0.05, dtype=np.float16) for _ in range(steps)]
    norm = cupy.asarray(rng.uniform(0.5, 1.5, hidden), dtype=np.float32)
    start = cupy.asarray(rng.standard_normal((rows, hidden)), dtype=np.float32)

    def chain(x):                              # the model's pattern: h = W1 rms_norm(x); x += W2 h
        for w1, w2 in zip(weights[::2], weights[1::2]):
            h = linear_rows(x, w1, None, norm_weight=norm, eps=1e-5, kernel=kernel)
            linear_rows(h, w2, None, residual=x, kernel=kernel)
        return x

    eager = chain(start.copy()).get()
    x = start.copy()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        chain(x)
        graph = stream.end_capture()
        for _ in range(2):                     # replays repeat: each starts from the same stream
            x[...] = start
            graph.launch(stream)
        stream.synchronize()
    np.testing.assert_array_equal(x.get(), eager)
    assert len(extended_launches) == (2 * len(weights[::2]) if pdl else 0)


def test_knocked_out_skips_launches_by_name_and_only_within_it(gpu):
    import cupy
    from packkv.kernels import model_ops
    from packkv.kernels.launch import knocked_out
    counters = cupy.zeros(4, np.int32)
    with knocked_out("add_", "argmax") as skipped:
        model_ops.add_one(counters)
        with knocked_out("rms_norm") as inner:        # a name that does not match: the launch runs
            model_ops.add_one(counters)
        model_ops.add_one(counters)                   # the outer names again
    model_ops.add_one(counters)
    assert counters.get().tolist() == [2, 2, 2, 2]
    assert skipped == {"add_": 2, "argmax": 0} and inner == {"rms_norm": 0}
