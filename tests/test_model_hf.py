"""packkv's Llama forward (CPU, fp32) against transformers' LlamaForCausalLM on tiny random checkpoints.

Every checkpoint is written by transformers itself (save_pretrained, safetensors) into tmp_path and loaded
back by packkv.weights.load_checkpoint, so the test covers the whole path: config.json parsing, safetensors
reading (fp32, bf16, sharded), tensor fusion, RoPE (plain, linear, llama3), GQA/MHA/MQA attention through
the dense cache, biases, tied embeddings, and the decode loop (one token at a time through the cache).

Weights are drawn with a much larger std than transformers' init (and RMSNorm weights far from 1), so that
the logits depend strongly on every detail: a wrong RoPE pairing, a wrong GQA grouping or a dropped bias
moves the logits by far more than the tolerance (max |diff| < 1e-4 * max |logit|).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from packkv.backend import get_backend  # noqa: E402
from packkv.cache import CacheShape, make_cache  # noqa: E402
from packkv.errors import PackkvError  # noqa: E402
from packkv.model import Llama  # noqa: E402
from packkv.weights import load_checkpoint  # noqa: E402

RTOL = 1e-4           # max |packkv - transformers| must stay below RTOL * max |transformers logit|
PREFILL, DECODE = 40, 8
ORIGINAL_CONTEXT = 32  # rope scaling's original_max_position_embeddings: the sequences go past it

BASE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": ORIGINAL_CONTEXT}
LINEAR = {"rope_type": "linear", "factor": 3.0}


def cpu_backend():
    return get_backend("cpu")


def randomize(model, seed: int) -> None:
    """Large random weights: matrices N(0, 0.25), biases N(0, 0.5), norm weights 1 + N(0, 0.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.25 * noise)


def make_hf_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    randomize(model, seed)
    return model


def save(model, folder, legacy_rope_config: bool = False, **kwargs):
    """save_pretrained; with legacy_rope_config, rewrite config.json the way checkpoints on the Hub made by
    transformers 4.x look (top-level rope_theta and rope_scaling instead of v5's rope_parameters)."""
    model.save_pretrained(folder, **kwargs)
    if legacy_rope_config:
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
        path.write_text(json.dumps(cfg, indent=2))
    return folder


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    """transformers' fp32 logits at every position of the full sequences, [B, T, vocab]."""
    with torch.no_grad():
        out = model.float()(torch.from_numpy(tokens.astype(np.int64)))
    return out.logits.float().numpy()


def packkv_model(folder):
    config, tensors = load_checkpoint(folder)
    return Llama(config, tensors, cpu_backend())


def dense_cache(model: Llama, batch: int, max_context: int):
    c = model.config
    shape = CacheShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, batch, max_context)
    return make_cache("dense", shape, model.backend)


def prefill_then_decode(model: Llama, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Logits at every position: one prefill of `prefill` tokens (all_logits), then one token per step."""
    B, T = tokens.shape
    cache = dense_cache(model, B, T)
    out = [model.forward(tokens[:, :prefill], cache, all_logits=True)]
    assert out[0].shape == (B, prefill, model.config.vocab_size)
    for t in range(prefill, T):
        step = model.forward(tokens[:, t:t + 1], cache)
        assert step.shape == (B, 1, model.config.vocab_size)
        out.append(step)
    assert list(cache.lengths) == [T] * B
    return np.concatenate(out, axis=1)


def assert_logits_close(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == np.float32
    scale = float(np.abs(want).max())
    assert scale > 1.0, "degenerate reference logits: the test would not discriminate"
    err = np.abs(got.astype(np.float64) - want).max(axis=-1)       # [B, T]
    bad = np.argwhere(err > RTOL * scale)
    assert bad.size == 0, (f"{what}: logits differ from transformers at (batch, position) {bad[:5].tolist()}; "
                           f"max |diff| {err.max():.3g} vs tolerance {RTOL * scale:.3g} (scale {scale:.3g})")


def random_tokens(seed: int, batch: int, length: int, vocab: int = BASE["vocab_size"]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int64)


# ---- one sequence, many architectures -------------------------------------------------------------------

CASES = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_attention_heads=8, num_key_value_heads=1, head_dim=8),
    "tied": dict(tie_word_embeddings=True),
    "head_dim_24": dict(head_dim=24),                 # 4 heads * 24 = 96 != hidden 64
    "bias": dict(attention_bias=True, mlp_bias=True),
    "rms_eps_big": dict(rms_norm_eps=0.05),
    "theta_500": dict(rope_theta=500.0),
    "llama3": dict(rope_scaling=LLAMA3, rope_theta=10000.0),
    "linear": dict(rope_scaling=LINEAR, rope_theta=2000.0),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["config_v5", "config_legacy"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case, legacy):
    seed = sorted(CASES).index(case)
    hf = make_hf_model(seed, **CASES[case])
    folder = save(hf, tmp_path / case, legacy_rope_config=legacy)
    tokens = random_tokens(seed, 1, PREFILL + DECODE)
    want = reference_logits(hf, tokens)
    got = prefill_then_decode(packkv_model(folder), tokens, PREFILL)
    assert_logits_close(got, want, case)


def test_rope_scaling_changes_the_logits(tmp_path):
    """Guards the rope cases above: the scaled models' logits really differ from the unscaled ones, so a
    loader that dropped rope_scaling could not pass them."""
    tokens = random_tokens(3, 1, PREFILL + DECODE)
    plain = reference_logits(make_hf_model(5), tokens)
    for scaling in (LLAMA3, LINEAR):
        scaled = reference_logits(make_hf_model(5, rope_scaling=scaling), tokens)
        assert np.abs(scaled - plain).max() > 100 * RTOL * np.abs(plain).max()


def test_bf16_checkpoint(tmp_path):
    hf = make_hf_model(11)
    with torch.no_grad():  # round the fp32 model's weights to bf16 values; save a bf16 copy of it
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    # (a bf16 copy, not hf.to(bf16): that would round the rotary inv_freq buffer of the reference too)
    folder = save(copy.deepcopy(hf).to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    header_len = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    tokens = random_tokens(11, 1, PREFILL + DECODE)
    want = reference_logits(hf, tokens)           # transformers in fp32 on the bf16-rounded weights
    config, tensors = load_checkpoint(folder)
    for name, p in hf.state_dict().items():        # the bf16 -> fp32 widening is exact
        if name in tensors:
            np.testing.assert_array_equal(np.asarray(tensors[name], dtype=np.float32), p.float().numpy(), name)
    got = prefill_then_decode(Llama(config, tensors, cpu_backend()), tokens, PREFILL)
    assert_logits_close(got, want, "bf16")


def test_sharded_checkpoint(tmp_path):
    hf = make_hf_model(12, attention_bias=True)
    folder = save(hf, tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and not (folder / "model.safetensors").exists()
    tokens = random_tokens(12, 1, PREFILL + DECODE)
    assert_logits_close(prefill_then_decode(packkv_model(folder), tokens, PREFILL),
                        reference_logits(hf, tokens), "sharded")


def test_last_position_logits_by_default(tmp_path):
    hf = make_hf_model(13)
    model = packkv_model(save(hf, tmp_path / "m"))
    tokens = random_tokens(13, 1, 17)
    last = model.forward(tokens, dense_cache(model, 1, 17))
    assert last.shape == (1, 1, BASE["vocab_size"])
    assert_logits_close(last, reference_logits(hf, tokens)[:, -1:], "last position")


# ---- batches ------------------------------------------------------------------------------------------

def test_batched_prefill_and_decode_equal_lengths(tmp_path):
    hf = make_hf_model(21)
    model = packkv_model(save(hf, tmp_path / "m"))
    tokens = random_tokens(21, 2, 28)
    got = prefill_then_decode(model, tokens, 20)
    assert_logits_close(got, reference_logits(hf, tokens), "batch of 2")
    for b in range(2):  # and each row equals that sequence run alone (to fp32 rounding)
        alone = prefill_then_decode(model, tokens[b:b + 1], 20)
        np.testing.assert_allclose(got[b:b + 1], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_batched_decode_different_lengths(tmp_path):
    """Two sequences of different lengths decode together through one dense cache: each one's positions,
    cache slots and causal mask come from its own length. (forward takes [B, T] with one T, so the two
    prompts are prefilled alone and their K/V copied into the batch cache.)"""
    hf = make_hf_model(22, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    model = packkv_model(save(hf, tmp_path / "m"))
    lengths, steps = (13, 29), DECODE
    seqs = [random_tokens(22 + b, 1, lengths[b] + steps)[0] for b in range(2)]
    context = max(lengths) + steps

    batch = dense_cache(model, 2, context)
    alone_logits = []
    for b, seq in enumerate(seqs):
        cache = dense_cache(model, 1, context)
        model.forward(seq[None, :lengths[b]], cache, all_logits=True)
        batch.k[:, b], batch.v[:, b] = cache.k[:, 0], cache.v[:, 0]
        batch.lengths[b] = cache.lengths[0]
        alone_logits.append([model.forward(seq[None, t:t + 1], cache)[0, 0]
                             for t in range(lengths[b], lengths[b] + steps)])

    got = np.stack([model.forward(np.array([[seqs[0][lengths[0] + j]], [seqs[1][lengths[1] + j]]]), batch)[:, 0]
                    for j in range(steps)], axis=1)                                   # [2, steps, vocab]
    assert list(batch.lengths) == [lengths[0] + steps, lengths[1] + steps]
    for b in range(2):
        want = reference_logits(hf, seqs[b][None])[0, lengths[b]:]
        assert_logits_close(got[b:b + 1], want[None], f"sequence {b} of a ragged batch")
        np.testing.assert_allclose(got[b], np.stack(alone_logits[b]), rtol=0, atol=1e-5 * np.abs(want).max())


# ---- the loader's checks ------------------------------------------------------------------------------

def test_loader_refuses_missing_and_misshapen_tensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = save(make_hf_model(31), tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PackkvError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(folder)

    folder = save(make_hf_model(31), tmp_path / "m2")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PackkvError, match="shape"):
        load_checkpoint(folder)
