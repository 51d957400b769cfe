"""The public API (packkv/__init__.py): the KV cache that a foreign model drives, and load/generate.

On the CPU: the wrapper gives exactly what the internal cache gives; layouts and array libraries
(NumPy, torch through DLPack) go in and come back out; the step ends by itself and every misuse is a
clear error; every wrong input (type, dtype, shape, device, layer, size) names the argument, what was
expected and what came; both examples run and stay within the compression's error bound of a dense
reference; generate streams the real SmolLM2's text. On the GPU (pytest -m gpu): the DLPack example
with torch CUDA tensors equals the NumPy reference within fp16 tolerance, without copies.
"""
from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import packkv
from packkv import codec
from packkv.backend import get_backend
from packkv.cache import CacheShape, DenseCache, PackkvCache
from packkv.errors import PackkvError

ROOT = Path(__file__).resolve().parents[1]
LAYERS, KV_HEADS, HEADS, HEAD_DIM = 2, 2, 6, 16


@functools.lru_cache(maxsize=None)
def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_cache(**kw) -> packkv.KVCache:
    params = dict(max_context=200, device="cpu", block=32, window=8)
    if kw.get("kind") == "dense":
        params.pop("block"), params.pop("window")
    params.update(kw)
    return packkv.KVCache(LAYERS, KV_HEADS, HEAD_DIM, **params)


def kvq(rng, T, batch=1, dtype=np.float32, heads=HEADS):
    shape = (batch, KV_HEADS, T, HEAD_DIM)
    return (rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype),
            rng.standard_normal((batch, heads, T, HEAD_DIM)).astype(dtype))


def one_step(cache, rng, T, batch=1):
    outs = []
    for layer in range(cache.layers):
        k, v, q = kvq(rng, T, batch)
        cache.append(layer, k, v)
        outs.append(cache.attend(layer, q))
    return outs


# ---- the compression's error bound --------------------------------------------------------------------

def compression_bound(q, k, v, params: codec.CodecParams):
    """An elementwise upper bound on |attention over what a packkv cache holds - exact attention|, from
    the codec's guarantee alone: every element of a compressed token is within step/2 of its fp16 value,
    step = (max - min) * rel over the token's channels (all KV heads' for 'token-layer'), rounded up to
    fp16; window tokens are only rounded to fp16. q [B, H, T, D]; k, v [B, Hkv, L, D]: the dense K/V.

    A score moves by at most eps = max over keys of sum_c |q_c| dK_c / sqrt(D), so every softmax weight
    by a factor within exp(+-2 eps): the weights move by at most exp(2 eps) - 1 in total (L1), and the
    output by that times the half-range of V, plus the largest error of V itself."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    group, D = q.shape[1] // k.shape[1], q.shape[-1]

    def element_error(x, rel):
        x16 = x.astype(np.float16).astype(np.float64)
        axes = (1, 3) if params.granularity == "token-layer" else (3,)
        spread = x16.max(axis=axes, keepdims=True) - x16.min(axis=axes, keepdims=True)
        step = spread * rel * (1 + 2.0 ** -9) + 2.0 ** -24             # >= the fp16 step the codec stores
        return step / 2 + np.abs(x - x16) + 1e-6 * np.abs(x)           # + fp16 input, + fp32 decode rounding

    dk = np.repeat(element_error(k, params.rel_k), group, axis=1)      # [B, H, L, D]
    dv = np.repeat(element_error(v, params.rel_v), group, axis=1)
    eps = (np.abs(q) @ dk.swapaxes(-1, -2)).max(axis=-1, keepdims=True) / np.sqrt(D)   # [B, H, T, 1]
    vv = np.repeat(v, group, axis=1)
    half_range = (vv.max(axis=2, keepdims=True) - vv.min(axis=2, keepdims=True)) / 2  # [B, H, 1, D]
    return np.expm1(2 * eps) * half_range + dv.max(axis=2, keepdims=True)


def dense_attention(q, k, v):
    return load_example("numpy_cache").dense_attention(q, k, v)


# ---- the wrapper is thin: exactly the internal cache ----------------------------------------------------

@pytest.mark.parametrize("kind", ["packkv", "dense"])
def test_wrapper_gives_exactly_what_the_internal_cache_gives(kind):
    rng = np.random.default_rng(0)
    api = small_cache(kind=kind, batch=2)
    shape = CacheShape(LAYERS, KV_HEADS, HEAD_DIM, 2, 200)
    cpu = get_backend("cpu")
    inner = (PackkvCache(shape, cpu, codec.CodecParams(block=32), window=8) if kind == "packkv"
             else DenseCache(shape, cpu))
    for T in [40] + [1] * 50:
        for layer in range(LAYERS):
            k, v, q = kvq(rng, T, batch=2)
            api.append(layer, k, v)
            inner.append(layer, k, v)
            assert np.array_equal(api.attend(layer, q), inner.attend(layer, q))
        inner.advance(T)
    assert api.length == 90 and api.bytes_used == inner.bytes_used() and api.bytes_reserved == inner.bytes_reserved()
    assert api.stats()["kv_bytes_used"] == inner.stats()["kv_bytes_used"]
    if kind == "packkv":
        assert int(inner.n_blocks[0]) >= 2            # blocks were compressed, not only the window
        assert api.compression_ratio == inner.stats()["compression_ratio"] > 1
    else:
        assert api.compression_ratio == pytest.approx(0.5)   # the CPU's dense cache holds float32


def test_step_ends_by_itself_after_every_layer_attended():
    cache, rng = small_cache(), np.random.default_rng(1)
    k, v, q = kvq(rng, 5)
    cache.append(0, k, v)
    assert cache.step_open and cache.length == 0
    cache.append(1, k, v)
    cache.attend(1, q)            # any order of layers after layer 0's append
    assert cache.step_open and cache.length == 0
    cache.attend(0, q)
    assert not cache.step_open and cache.length == 5


def test_three_dimensional_layout_for_batch_one_gives_the_same_output():
    rng = np.random.default_rng(2)
    a, b = small_cache(), small_cache()
    for T in [30, 1, 1]:
        for layer in range(LAYERS):
            k, v, q = kvq(rng, T)
            a.append(layer, k, v)
            b.append(layer, k[0], v[0])
            out4, out3 = a.attend(layer, q), b.attend(layer, q[0])
            assert out4.shape == (1, HEADS, T, HEAD_DIM) and out3.shape == (HEADS, T, HEAD_DIM)
            assert np.array_equal(out4[0], out3)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_out_follows_q_dtype(dtype):
    rng = np.random.default_rng(3)
    cache = small_cache()
    k, v, q = kvq(rng, 4, dtype=dtype)
    for layer in range(LAYERS):
        cache.append(layer, k, v)
        out = cache.attend(layer, q)
        assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == q.shape


def test_torch_cpu_tensors_in_torch_tensors_out_without_copies():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    cache, reference = small_cache(), small_cache()
    for T in [20, 1]:
        for layer in range(LAYERS):
            k, v, q = kvq(rng, T)
            tk, tv, tq = (torch.from_numpy(x) for x in (k, v, q))
            cache.append(layer, tk, tv.transpose(2, 3).contiguous().transpose(2, 3))   # strided is fine
            reference.append(layer, k, v)
            out = cache.attend(layer, tq)
            assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device.type == "cpu"
            assert np.array_equal(out.numpy(), reference.attend(layer, q))
    t = torch.randn(1, KV_HEADS, 3, HEAD_DIM)
    arr, _ = cache._import(t, "k", "append")
    assert np.shares_memory(arr, t.numpy())         # numpy.from_dlpack: the tensor's own memory


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_torch_dtypes_come_back_in_q_dtype(dtype):
    torch = pytest.importorskip("torch")
    dt = getattr(torch, dtype)
    cache = small_cache()
    for layer in range(LAYERS):
        cache.append(layer, torch.randn(KV_HEADS, 3, HEAD_DIM, dtype=dt), torch.randn(KV_HEADS, 3, HEAD_DIM, dtype=dt))
        out = cache.attend(layer, torch.randn(HEADS, 3, HEAD_DIM, dtype=dt))
        assert out.dtype == dt and tuple(out.shape) == (HEADS, 3, HEAD_DIM) and torch.isfinite(out.float()).all()


def test_nonfinite_refusal_drops_the_step_and_the_cache_goes_on():
    cache, rng = small_cache(), np.random.default_rng(5)
    one_step(cache, rng, 10)
    for layer in range(LAYERS):
        k, v, q = kvq(rng, 40)
        k[0, 1, 3, 5] = np.nan       # position 13: in the first block, which this step's end compresses
        cache.append(layer, k, v)
        if layer < LAYERS - 1:
            cache.attend(layer, q)
        else:   # the last attend ends the step, which compresses a block that holds the NaN
            with pytest.raises(PackkvError, match="not finite"):
                cache.attend(layer, q)
    assert cache.length == 10 and not cache.step_open and cache.bytes_used == 10 * LAYERS * KV_HEADS * HEAD_DIM * 4
    one_step(cache, rng, 40)
    assert cache.length == 50 and cache.compression_ratio > 1


# ---- misuse of the step: clear errors ------------------------------------------------------------------

def expect(kind, *fragments):
    """pytest.raises for a PackkvError that is also `kind` and whose message has every fragment."""
    class Matcher:
        def __enter__(self):
            self.ctx = pytest.raises(kind)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self.ctx.__exit__(*exc)
            assert isinstance(self.info.value, PackkvError), type(self.info.value)
            message = str(self.info.value)
            for fragment in fragments:
                assert fragment in message, f"{fragment!r} not in {message!r}"
            return suppressed
    return Matcher()


def test_attend_before_append_is_an_error():
    cache, rng = small_cache(), np.random.default_rng(6)
    k, v, q = kvq(rng, 3)
    with expect(RuntimeError, "attend(layer 0)", "append(0, k, v) first"):
        cache.attend(0, q)
    cache.append(0, k, v)
    with expect(RuntimeError, "attend(layer 1)", "append(1, k, v) first"):
        cache.attend(1, q)


def test_a_step_begins_with_layer_zero():
    cache, rng = small_cache(), np.random.default_rng(7)
    k, v, _ = kvq(rng, 3)
    with expect(RuntimeError, "append(layer 1)", "begins with append(0, k, v)", "got layer 1"):
        cache.append(1, k, v)


def test_second_append_or_attend_of_a_layer_names_the_missing_layers():
    cache, rng = small_cache(), np.random.default_rng(8)
    k, v, q = kvq(rng, 3)
    cache.append(0, k, v)
    with expect(RuntimeError, "layer 0 already appended", "not appended yet: [1]", "not attended yet: [0, 1]",
                "discard_step()"):
        cache.append(0, k, v)
    cache.attend(0, q)
    with expect(RuntimeError, "layer 0 already attended", "not appended yet: [1]", "not attended yet: [1]"):
        cache.attend(0, q)


def test_forgetting_a_layer_is_caught_at_the_next_step():
    cache, rng = small_cache(), np.random.default_rng(9)
    k, v, q = kvq(rng, 3)
    cache.append(0, k, v)
    cache.attend(0, q)
    cache.append(1, k, v)            # ... and layer 1 never attends
    k2, v2, _ = kvq(rng, 1)
    with expect(RuntimeError, "append(layer 0)", "already appended", "not attended yet: [1]"):
        cache.append(0, k2, v2)
    cache.discard_step()
    assert not cache.step_open and cache.length == 0
    one_step(cache, rng, 1)
    assert cache.length == 1


def test_token_counts_must_agree_within_a_step():
    cache, rng = small_cache(), np.random.default_rng(10)
    k, v, q = kvq(rng, 4)
    cache.append(0, k, v)
    k3, v3, q3 = kvq(rng, 3)
    with expect(ValueError, "append(layer 1)", "3 tokens", "this step has 4"):
        cache.append(1, k3, v3)
    with expect(ValueError, "attend(layer 0)", "q has 3 tokens", "appended 4"):
        cache.attend(0, q3)


def test_context_and_step_size_limits():
    cache, rng = small_cache(max_context=50, max_step_tokens=40), np.random.default_rng(11)
    k, v, _ = kvq(rng, 41)
    with expect(ValueError, "41 new tokens in one step", "max_step_tokens=40"):
        cache.append(0, k, v)
    one_step(cache, rng, 40)
    k, v, _ = kvq(rng, 11)
    with expect(ValueError, "sequences 51 tokens long", "max_context=50"):
        cache.append(0, k, v)
    one_step(cache, rng, 10)
    assert cache.length == 50


# ---- wrong inputs: argument, expected, received ------------------------------------------------------------

class FakeCudaTensor:
    """A DLPack producer that lives on CUDA device 0 (it must never be read on a CPU cache)."""
    dtype = "float16"
    shape = (KV_HEADS, 3, HEAD_DIM)
    ndim = 3

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, **kwargs):
        raise AssertionError("a CPU cache must not read a CUDA tensor")


@pytest.mark.parametrize("bad, fragments", [
    ([[1.0]], ["k must be an array", "NumPy, CuPy, or a DLPack tensor", "not list"]),
    (3.0, ["k must be an array", "not float"]),
    (np.zeros((KV_HEADS, 3, HEAD_DIM), np.int32), ["k has dtype int32", "expected one of float16, float32"]),
    (np.zeros((KV_HEADS, 3, HEAD_DIM), bool), ["k has dtype bool"]),
    (np.zeros((KV_HEADS, 3, HEAD_DIM), np.complex64), ["k has dtype complex64"]),
])
def test_wrong_type_or_dtype(bad, fragments):
    cache = small_cache()
    with expect(TypeError, "append(layer 0)", *fragments):
        cache.append(0, bad, np.zeros((KV_HEADS, 3, HEAD_DIM), np.float32))


@pytest.mark.parametrize("shape, fragments", [
    ((3, 3, HEAD_DIM), ["k must be [batch=1, kv_heads, T, head_dim=16]", "with kv_heads=2", "got shape (3, 3, 16)"]),
    ((1, KV_HEADS, 3, 8), ["head_dim=16", "got shape (1, 2, 3, 8)"]),
    ((2, KV_HEADS, 3, HEAD_DIM), ["batch=1", "got shape (2, 2, 3, 16)"]),
    ((1, 1, KV_HEADS, 3, HEAD_DIM), ["k must be [batch=1, kv_heads, T, head_dim=16] or [kv_heads, T, head_dim=16]",
                                     "got shape (1, 1, 2, 3, 16)"]),
    ((KV_HEADS, 0, HEAD_DIM), ["T >= 1", "got shape (2, 0, 16)"]),
])
def test_wrong_kv_shape(shape, fragments):
    cache = small_cache()
    with expect(ValueError, "append(layer 0)", *fragments):
        cache.append(0, np.zeros(shape, np.float32), np.zeros(shape, np.float32))


def test_v_must_match_k_and_batch_must_match():
    cache = small_cache()
    k = np.zeros((KV_HEADS, 3, HEAD_DIM), np.float32)
    with expect(ValueError, "v must have k's shape (1, 2, 3, 16)", "got (1, 2, 4, 16)"):
        cache.append(0, k, np.zeros((KV_HEADS, 4, HEAD_DIM), np.float32))
    batched = small_cache(batch=2)
    with expect(ValueError, "k has shape (2, 3, 16)", "cache of batch 1, this one has batch 2",
                "expected [batch=2, kv_heads, T, head_dim=16]"):
        batched.append(0, k, k)


def test_wrong_q_shape():
    cache, rng = small_cache(), np.random.default_rng(12)
    k, v, _ = kvq(rng, 3)
    cache.append(0, k, v)
    with expect(ValueError, "attend(layer 0)", "q must be", "heads a multiple of kv_heads=2", "got shape (1, 5, 3, 16)"):
        cache.attend(0, np.zeros((1, 5, 3, HEAD_DIM), np.float32))
    with expect(ValueError, "attend(layer 0)", "head_dim=16", "got shape (6, 3, 32)"):
        cache.attend(0, np.zeros((6, 3, 32), np.float32))


def test_gpu_tensor_into_a_cpu_cache():
    cache = small_cache()
    with expect(ValueError, "append(layer 0)", "k is on CUDA device 0, but this cache is on the CPU",
                "device='gpu'"):
        cache.append(0, FakeCudaTensor(), FakeCudaTensor())


def test_torch_tensor_that_requires_grad_is_refused_with_torch_s_reason():
    torch = pytest.importorskip("torch")
    cache = small_cache()
    t = torch.zeros(KV_HEADS, 3, HEAD_DIM, requires_grad=True)
    with expect(TypeError, "append(layer 0)", "k (Tensor) cannot be taken through DLPack", "detach"):
        cache.append(0, t, t)


@pytest.mark.parametrize("layer, kind, fragment", [
    (2, ValueError, "layer must be in 0..1, got 2"),
    (-1, ValueError, "layer must be in 0..1, got -1"),
    ("0", TypeError, "layer must be an int, not str"),
    (True, TypeError, "layer must be an int, not bool"),
])
def test_wrong_layer(layer, kind, fragment):
    cache = small_cache()
    k = np.zeros((KV_HEADS, 3, HEAD_DIM), np.float32)
    with expect(kind, fragment):
        cache.append(layer, k, k)
    with expect(kind, fragment):
        cache.attend(layer, np.zeros((HEADS, 3, HEAD_DIM), np.float32))


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(layers=0), ["KVCache: layers must be an integer >= 1, not 0"]),
    (dict(head_dim=2.5), ["head_dim must be an integer >= 1, not 2.5"]),
    (dict(max_context=None), ["max_context must be an integer >= 1, not None"]),
    (dict(batch=0), ["batch must be an integer >= 1, not 0"]),
    (dict(kind="fp8"), ["cache kind must be 'dense' or 'packkv', not 'fp8'"]),
    (dict(rel_k=2.0), ["KVCache: rel_k must be in [2**-12, 1]", "got 2.0"]),
    (dict(granularity="token"), ["granularity must be one of", "got 'token'"]),
    (dict(block=40), ["block must be a multiple of pack (16)", "got 40"]),
    (dict(window=-1), ["window must be an integer >= 0", "not -1"]),
    (dict(kind="dense", rel_k=0.1, window=8), ["rel_k, window only apply to the 'packkv' cache"]),
    (dict(head_dim=70000), ["packkv format takes kv_heads <= 255 and head_dim <= 65535"]),
    (dict(device="tpu"), ["KVCache: device must be 'auto', 'cpu' or 'gpu', not 'tpu'"]),
])
def test_wrong_construction(kwargs, fragments):
    args = dict(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_context=100, device="cpu")
    args.update(kwargs)
    with expect(ValueError, *fragments):
        packkv.KVCache(args.pop("layers"), args.pop("kv_heads"), args.pop("head_dim"), **args)


def test_no_usable_gpu_is_said_in_the_api_s_words():
    from packkv.backend import gpu_problem
    if gpu_problem() is None:
        pytest.skip("this machine has a usable GPU")
    with expect(PackkvError, "KVCache: device gpu was asked for, but"):
        packkv.KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_context=10, device="gpu")


def test_import_packkv_is_light():
    code = ("import sys, packkv; heavy = [m for m in ('packkv.generate', 'packkv.model', 'tokenizers', 'torch') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the examples ----------------------------------------------------------------------------------------

TIGHT = dict(rel_k=2.0 ** -10, rel_v=2.0 ** -10)


def assert_within_bound(calls_by_layer, params):
    """calls_by_layer[layer]: [(q, out, n_keys)], k/v the layer's dense history: |out - exact| <= bound."""
    worst = 0.0
    for q, out, k, v in calls_by_layer:
        ref = dense_attention(q, k, v)
        bound = compression_bound(q, k, v, params) + 1e-4 * (1 + np.abs(ref))   # + float32 arithmetic
        excess = np.abs(np.asarray(out, np.float64) - ref) - bound
        assert excess.max() <= 0, f"attention error exceeds the compression bound by {excess.max()}"
        worst = max(worst, float((np.abs(out - ref) / bound).max()))
    return worst


@pytest.mark.parametrize("params", [{}, TIGHT], ids=["codec-defaults", "rel-2^-10"])
def test_numpy_example_is_within_the_compression_bound(params):
    example = load_example("numpy_cache")
    r = example.run(prompt=100, decode=12, record=True, window=32, **params)
    assert r["tokens"] == 112 and r["stats"]["compression_ratio"] > 1
    codec_params = codec.CodecParams(**params)
    calls = [(q, out, r["k"][layer][:, :, :n], r["v"][layer][:, :, :n]) for layer, q, out, ref, n in r["calls"]]
    assert_within_bound(calls, codec_params)
    if params:
        assert r["max_diff"] < 0.01 * r["max_ref"]


def test_numpy_example_dense_is_exact():
    r = load_example("numpy_cache").run(prompt=100, decode=5, kind="dense")
    assert r["max_diff"] < 1e-5 * r["max_ref"]


def test_numpy_example_runs_as_a_script():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "numpy_cache.py"), "--rel-k", "0.01"],
                         capture_output=True, text=True, check=True, cwd="/").stdout
    assert "360 tokens x 4 layers x batch 2 in a packkv cache" in out and "'rel_k': 0.01" in out
    diff = float(re.search(r"over every call: ([0-9.]+)", out).group(1))
    assert 0 < diff < 0.1


def torch_example_calls(r):
    """The torch example's recorded calls -> [(q, out, k history, v history)] per call, in order."""
    history, calls = {}, []
    for layer, q, k, v, out in r["calls"]:
        hk, hv = history.get(layer, (k[:, :, :0], v[:, :, :0]))
        history[layer] = hk, hv = np.concatenate([hk, k], axis=2), np.concatenate([hv, v], axis=2)
        calls.append((q, out, hk, hv))
    return calls


@pytest.mark.parametrize("params", [{}, TIGHT], ids=["codec-defaults", "rel-2^-10"])
def test_torch_example_is_within_the_compression_bound(params):
    pytest.importorskip("torch")
    example = load_example("foreign_torch_dlpack")
    r = example.run("cpu", prompt=100, tokens=12, record=True, window=32, **params)
    assert r["device"] == "cpu" and len(r["generated"]) == 12 and r["stats"]["length"] == 111
    assert r["stats"]["compression_ratio"] > 1
    assert_within_bound(torch_example_calls(r), codec.CodecParams(**params))
    if params:
        assert r["max_diff"] < 0.01 * r["max_ref"]


def test_torch_example_main_prints_its_comparison(capsys):
    pytest.importorskip("torch")
    load_example("foreign_torch_dlpack").main(["--device", "cpu", "--prompt", "40", "--tokens", "4", "--cache", "dense"])
    out = capsys.readouterr().out
    assert "torch on cpu (torch.float32), KV in a dense cache on CPU (numpy)" in out
    diff = float(re.search(r"over every call: ([0-9.]+)", out).group(1))
    assert diff < 1e-4


# ---- the README's snippets run ------------------------------------------------------------------------------

def readme_snippets():
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- api -->", 1)[1].split("<!-- /api -->", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_cache_snippet_runs():
    snippets = [s for s in readme_snippets() if "packkv.KVCache(" in s]
    assert snippets, "the README's API section shows the KV cache"
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {})


# ---- load and generate on the real SmolLM2 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(smollm2_folder):
    return packkv.load(str(smollm2_folder), device="cpu", max_context=256)


@pytest.mark.slow
def test_generate_streams_the_text(model):
    pieces = []
    r = model.generate("The capital of France is", max_tokens=6, cache="packkv", on_text=pieces.append)
    assert "Paris" in r.text
    assert "".join(pieces) == r.text and len(pieces) > 1 and all(pieces)
    assert len(r.token_ids) == 6 and r.stop_reason == "max_tokens" and r.prompt_ids == model.tokenizer.encode(
        "The capital of France is")
    assert r.stats["cache"] == "packkv" and r.stats["generated_tokens"] == 6 and r.stats["kv_bytes_used"] > 0


@pytest.mark.slow
def test_generate_takes_ids_chat_sampling_and_packkv_parameters(model):
    ids = model.tokenizer.encode("The capital of France is")
    greedy = model.generate(ids, max_tokens=2, cache="dense")
    assert greedy.prompt_ids == ids and "Paris" in greedy.text and greedy.stats["cache"] == "dense"
    a, b = (model.generate("Hi", max_tokens=3, chat=True, temperature=0.8, top_p=0.9, top_k=40, seed=3)
            for _ in range(2))
    assert a.token_ids == b.token_ids and len(a.prompt_ids) > len(model.tokenizer.encode("Hi"))
    r = model.generate(ids, max_tokens=1, cache="packkv", rel_k=0.05, window=16, block=32, stop_at_eos=False)
    assert r.stats["kv_params"]["rel_k"] == 0.05 and r.stats["kv_params"]["window"] == 16
    assert "30 layers" in repr(model) and model.device == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, kind, fragment", [
    (dict(max_tokens=0), ValueError, "max_tokens must be an integer >= 1, not 0"),
    (dict(temperature=-1), ValueError, "temperature must be a finite number >= 0"),
    (dict(top_p=0), ValueError, "top_p must be in (0, 1], not 0"),
    (dict(top_k=1.5), ValueError, "top_k must be an integer >= 0"),
    (dict(cache="fp8"), ValueError, "cache kind must be 'dense' or 'packkv', not 'fp8'"),
    (dict(rel_k=0.1), ValueError, "rel_k only apply to the 'packkv' cache"),
    (dict(cache="packkv", pack=12), ValueError, "pack must be one of (8, 16, 32), got 12"),
    (dict(on_text="print"), TypeError, "on_text must be a callable"),
    (dict(prompt=b"bytes"), TypeError, "prompt must be a str or a list of token ids, not bytes"),
    (dict(prompt=[1, 2, 10 ** 9]), ValueError, "prompt token ids must be in 0..49151"),
    (dict(prompt=""), PackkvError, "the prompt is empty"),
    (dict(prompt=[1] * 300), ValueError, "the prompt has 300 tokens, which leaves no room in the context of 256"),
    (dict(prompt="word " * 300), PackkvError, "raise max_context)"),
])
def test_generate_refuses_bad_arguments(model, kwargs, kind, fragment):
    prompt = kwargs.pop("prompt", "Hello")
    with expect(kind, fragment):
        model.generate(prompt, **kwargs)


@pytest.mark.slow
def test_load_refuses_bad_arguments(smollm2_folder, tmp_path):
    with expect(PackkvError, "load: max_context must be in 1..8192"):
        packkv.load(str(smollm2_folder), device="cpu", max_context=10 ** 6)
    with expect(PackkvError, "load: device must be auto, cpu or gpu, not 'tpu'"):
        packkv.load(str(smollm2_folder), device="tpu")
    with expect(PackkvError, "load:"):
        packkv.load(str(tmp_path / "no-such-model"), device="cpu")


@pytest.mark.slow
def test_readme_generate_snippet_runs(smollm2_folder):
    snippets = [s for s in readme_snippets() if "packkv.load(" in s]
    assert snippets, "the README's API section shows load and generate"
    for snippet in snippets:   # on the CPU, with a short context, so that it is quick
        snippet = snippet.replace("packkv.load()", f"packkv.load({str(smollm2_folder)!r}, device='cpu', max_context=256)")
        snippet = snippet.replace("max_tokens=16", "max_tokens=3")
        exec(compile(snippet, "README.md", "exec"), {})


# ---- on the GPU ----------------------------------------------------------------------------------------------

def cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


@pytest.mark.gpu
def test_gpu_dlpack_example_equals_the_numpy_reference(gpu):
    """The example on torch CUDA tensors (fp16), replayed call by call into a NumPy cache on the CPU: the
    same fp16 K/V compress to the same blocks, so the outputs agree within fp16 arithmetic."""
    cuda_torch()
    example = load_example("foreign_torch_dlpack")
    r = example.run("cuda", prompt=200, tokens=40, record=True, window=32)
    assert r["device"] == "cuda" and r["dtype"] == "torch.float16" and r["stats"]["length"] == 239
    reference = packkv.KVCache(example.LAYERS, example.KV_HEADS, example.HEAD_DIM, max_context=240, device="cpu",
                               window=32)
    worst = 0.0
    for layer, q, k, v, out in r["calls"]:
        assert out.dtype == np.float16
        reference.append(layer, k, v)
        expected = reference.attend(layer, q.astype(np.float32))
        np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)
        worst = max(worst, float(np.abs(out - expected).max()))
    assert reference.length == 239 and reference.bytes_used == r["stats"]["kv_bytes_used"]
    assert_within_bound(torch_example_calls(r), codec.CodecParams())   # and vs torch's own dense attention


@pytest.mark.gpu
def test_gpu_torch_tensors_go_in_and_come_out_without_copies(gpu):
    torch = cuda_torch()
    cache = packkv.KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_context=64, device="gpu")
    k = torch.randn(KV_HEADS, 5, HEAD_DIM, device="cuda", dtype=torch.float16)
    arr, _ = cache._import(k, "k", "append")
    assert arr.data.ptr == k.data_ptr()                  # cupy.from_dlpack: torch's own memory
    for layer in range(LAYERS):
        cache.append(layer, k, k)
        out = cache.attend(layer, torch.randn(HEADS, 5, HEAD_DIM, device="cuda", dtype=torch.float16))
        assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float16
    with expect(ValueError, "k is on the CPU, but this cache is on CUDA device", "device='cpu'"):
        cache.append(0, k.cpu(), k.cpu())
    with expect(ValueError, "k is on the CPU, but this cache is on CUDA device"):
        cache.append(0, np.zeros((KV_HEADS, 1, HEAD_DIM), np.float16), np.zeros((KV_HEADS, 1, HEAD_DIM), np.float16))


@pytest.mark.gpu
def test_gpu_cupy_arrays_equal_the_numpy_cache(gpu):
    import cupy
    rng = np.random.default_rng(13)
    on_gpu = packkv.KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_context=200, device="gpu", window=8, block=32)
    on_cpu = small_cache()
    for T in [60] + [1] * 20:
        for layer in range(LAYERS):
            k, v, q = kvq(rng, T, dtype=np.float16)
            on_gpu.append(layer, cupy.asarray(k), cupy.asarray(v))
            on_cpu.append(layer, k, v)
            out = on_gpu.attend(layer, cupy.asarray(q))
            assert isinstance(out, cupy.ndarray) and out.dtype == np.float16
            np.testing.assert_allclose(out.get().astype(np.float32), on_cpu.attend(layer, q.astype(np.float32)),
                                       rtol=1e-2, atol=1e-2)
    assert on_gpu.bytes_used == on_cpu.bytes_used
    with expect(ValueError, "k is on CUDA device 0, but this cache is on the CPU"):
        on_cpu.append(0, cupy.asarray(k), cupy.asarray(v))
