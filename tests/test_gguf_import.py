"""GGUF import: tiny llama GGUF files written with gguf.GGUFWriter the way llama.cpp's converter
(convert_hf_to_gguf.py) writes them, from random transformers checkpoints, imported with
packkv.weights.gguf_import.import_gguf and checked against the original model and tokenizer.

The converter's two traps are both exercised: q_proj/k_proj rows permuted per head (k with the KV head
count under GQA), and a byte-level BPE tokenizer that only exists as metadata.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from packkv.backend import get_backend  # noqa: E402
from packkv.cache import CacheShape, make_cache  # noqa: E402
from packkv.errors import PackkvError  # noqa: E402
from packkv.model import Llama  # noqa: E402
from packkv.weights import Tokenizer, load_checkpoint  # noqa: E402
from packkv.weights.gguf_import import hf_tensor_name, import_gguf, unpermute_rows  # noqa: E402

RTOL = 1e-4   # weights are rounded to fp16 before writing, so the importer's fp16 storage loses nothing

# ---- a tiny byte-level BPE vocabulary (GPT-2 byte alphabet, a few merges, ChatML specials) -------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġa n", "Ġan d", "1 2", "Ã ©", "c a", "ca f", "caf Ã©", "Ġ caf\u00c3\u00a9"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what byte-level BPE vocabularies are spelled in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_CHARS = [bytes_to_unicode()[b] for b in range(256)]
TOKENS = SPECIALS + BYTE_CHARS + ["".join(m.split(" ")) for m in MERGES]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))   # 3 = control, 1 = normal
VOCAB = len(TOKENS)
ID = {t: i for i, t in enumerate(TOKENS)}
assert len(ID) == VOCAB


def byte_id(ch: str) -> int:
    (b,) = ch.encode()
    return len(SPECIALS) + b


# ---- the model side -------------------------------------------------------------------------------------

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=5000.0,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=0)


def make_hf_model(seed: int, **overrides):
    """Random weights with a large std, rounded to fp16 values (the importer stores fp16)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **overrides})).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            value = 1.0 + 0.5 * noise if name.endswith("norm.weight") else (0.5 if name.endswith(".bias") else 0.25) * noise
            p.copy_(value.half().float())
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim (on NumPy instead of torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    stem, _, suffix = hf_name.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, layer, rest = stem.split(".", 3)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.{suffix}"
    return f"{GGUF_NAMES[stem]}.{suffix}"


def llama3_rope_factors(cfg) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs tensor for llama3 rope scaling (llama.cpp divides by it)."""
    s = cfg.rope_parameters
    dim = cfg.head_dim
    freqs = 1.0 / (s["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_gguf(path, model=None, *, arch="llama", f16=True, tokenizer_model="gpt2", pre="smollm",
               add_bos=None, with_tensors=True):
    """A llama GGUF as llama.cpp's converter writes it: metadata, tokenizer, permuted q/k, F16 or F32."""
    cfg = model.config if model is not None else transformers.LlamaConfig(**BASE)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.head_dim
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test-model")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types(TOKEN_TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(ID["<|im_start|>"])
    w.add_eos_token_id(ID["<|endoftext|>"])
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)

    if with_tensors:
        if rope.get("rope_type") == "llama3":
            w.add_tensor("rope_freqs.weight", llama3_rope_factors(cfg))
        for name, t in model.state_dict().items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            a = t.float().numpy()
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                a = llama_cpp_permute(a, heads, heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                a = llama_cpp_permute(a, heads, kv_heads)
            # llama.cpp keeps 1-D tensors (norms, biases) in F32
            w.add_tensor(gguf_name(name), a.astype(np.float16 if f16 and a.ndim > 1 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- running the models ------------------------------------------------------------------------------------

def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def packkv_logits(folder, tokens: np.ndarray, prefill: int) -> np.ndarray:
    """Prefill (all positions' logits), then one token per step through the dense cache."""
    config, tensors = load_checkpoint(folder)
    backend = get_backend("cpu")
    model = Llama(config, tensors, backend)
    B, T = tokens.shape
    cache = make_cache("dense", CacheShape(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                           B, T), backend)
    out = [model.forward(tokens[:, :prefill], cache, all_logits=True)]
    out += [model.forward(tokens[:, t:t + 1], cache) for t in range(prefill, T)]
    return np.concatenate(out, axis=1)


def assert_logits_close(got, want, what=""):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(np.abs(want).max())
    assert scale > 1.0, "degenerate reference logits"
    err = np.abs(got.astype(np.float64) - want).max(axis=-1)
    bad = np.argwhere(err > RTOL * scale)
    assert bad.size == 0, (f"{what}: imported model's logits differ at (batch, position) {bad[:5].tolist()}: "
                           f"max |diff| {err.max():.3g}, tolerance {RTOL * scale:.3g}")


def tokens_for(seed, length=40):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(1, length), dtype=np.int64)


# ---- the permutation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rows_per_head,heads", [(2, 1), (8, 3), (16, 4), (64, 9)])
@pytest.mark.parametrize("trailing", [(), (5,)], ids=["bias", "weight"])
def test_unpermute_inverts_llama_cpp_permute(rows_per_head, heads, trailing):
    w = np.random.default_rng(heads).standard_normal((heads * rows_per_head, *trailing)).astype(np.float32)
    permuted = llama_cpp_permute(w, heads)
    if rows_per_head > 2:
        assert not np.array_equal(permuted, w)          # the permutation does something
    np.testing.assert_array_equal(unpermute_rows(permuted, heads), w)
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_rows(w, heads), heads), w)


def test_unpermute_interleaves_halves_per_head():
    """Head h's rows (first half a0..a3, second half b0..b3) are stored a0 b0 a1 b1 ... in the GGUF."""
    w = np.arange(16.0)
    stored = llama_cpp_permute(w, 2)
    np.testing.assert_array_equal(stored, [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15])
    np.testing.assert_array_equal(unpermute_rows(stored, 2), w)


def test_gqa_k_permutation_needs_the_kv_head_count():
    """k_proj of a GQA model (4 query heads, 2 KV heads): permuted with the KV count, as the converter does;
    undoing it with the query-head count gives different rows, so an importer that did would be caught."""
    k = np.random.default_rng(0).standard_normal((2 * 16, 8)).astype(np.float32)   # 2 KV heads, head_dim 16
    stored = llama_cpp_permute(k, 4, 2)
    np.testing.assert_array_equal(stored, llama_cpp_permute(k, 2))
    np.testing.assert_array_equal(unpermute_rows(stored, 2), k)
    assert not np.array_equal(unpermute_rows(stored, 4), k)


def test_hf_tensor_names():
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("output_norm.weight") == "model.norm.weight"
    assert hf_tensor_name("blk.11.attn_q.weight") == "model.layers.11.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_tensor_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_tensor_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    for hf in transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "attention_bias": True,
                                                                          "mlp_bias": True})).state_dict():
        assert hf_tensor_name(gguf_name(hf)) == hf


# ---- import, then compare logits with the original model ---------------------------------------------------

MODEL_CASES = {
    "gqa_f16": dict(),
    "gqa_f32": dict(f16=False),
    "mha": dict(num_key_value_heads=4),
    "gqa_4to1_tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim_24": dict(head_dim=24),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 3.0}),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_imported_logits_match_original(tmp_path, case):
    overrides = dict(MODEL_CASES[case])
    f16 = overrides.pop("f16", True)
    seed = sorted(MODEL_CASES).index(case)
    model = make_hf_model(seed, **overrides)
    path = write_gguf(tmp_path / "m.gguf", model, f16=f16)
    folder = import_gguf(path, tmp_path / "imported")
    assert not (tmp_path / "imported.partial").exists()

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_key_value_heads"] == model.config.num_key_value_heads
    assert cfg["tie_word_embeddings"] == model.config.tie_word_embeddings
    assert cfg["rope_theta"] == BASE["rope_theta"]
    assert cfg["rms_norm_eps"] == pytest.approx(BASE["rms_norm_eps"])
    assert cfg["max_position_embeddings"] == BASE["max_position_embeddings"]

    tokens = tokens_for(seed)
    want = reference_logits(model, tokens)
    assert_logits_close(packkv_logits(folder, tokens, prefill=32), want, case)
    # the folder is a valid transformers checkpoint too
    again = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert_logits_close(reference_logits(again, tokens), want, f"{case} (transformers on the import)")


def test_imported_tensors_equal_the_originals(tmp_path):
    model = make_hf_model(7, attention_bias=True)
    folder = import_gguf(write_gguf(tmp_path / "m.gguf", model), tmp_path / "imported")
    _, tensors = load_checkpoint(folder)
    for name, t in model.state_dict().items():
        assert tensors[name].dtype == np.float16, name
        np.testing.assert_array_equal(tensors[name].astype(np.float32), t.numpy(), err_msg=name)


def test_llama3_rope_freqs_are_not_silently_dropped(tmp_path):
    """llama.cpp's converter stores llama3 rope scaling only as a `rope_freqs` tensor (per-frequency
    divisors), no metadata key. An importer must carry it into the model or refuse the file: importing it
    as unscaled RoPE gives a model whose logits are wrong."""
    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    model = make_hf_model(8, rope_scaling=scaling, rope_theta=10000.0)
    path = write_gguf(tmp_path / "m.gguf", model)
    try:
        folder = import_gguf(path, tmp_path / "imported")
    except PackkvError as exc:
        assert "rope" in str(exc).lower()
        return
    tokens = tokens_for(8, 48)
    assert_logits_close(packkv_logits(folder, tokens, prefill=40), reference_logits(model, tokens), "llama3")


# ---- what the importer refuses ---------------------------------------------------------------------------

def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", make_hf_model(9), arch="gpt2")
    with pytest.raises(PackkvError, match="gpt2"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokenizer_model,pre,match", [("llama", "default", "llama"), ("gpt2", "qwen2", "qwen2")])
def test_unsupported_tokenizer(tmp_path, tokenizer_model, pre, match):
    path = write_gguf(tmp_path / "m.gguf", make_hf_model(10), tokenizer_model=tokenizer_model, pre=pre)
    with pytest.raises(PackkvError, match=match):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_file(tmp_path):
    with pytest.raises(PackkvError):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "out")


# ---- the rebuilt tokenizer ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imported_tokenizers(tmp_path_factory):
    """One imported folder per pre-tokenizer (and one with add_bos_token), tensors included."""
    base = tmp_path_factory.mktemp("tok")
    model = make_hf_model(12)
    folders = {}
    for key, pre, add_bos in [("smollm", "smollm", None), ("gpt2", "gpt2", None), ("bos", "smollm", True)]:
        folders[key] = import_gguf(write_gguf(base / f"{key}.gguf", model, pre=pre, add_bos=add_bos), base / key)
    return folders


TEXTS = ["Hello, world!", "the cat and the café", "naïve café, 日本語のテキスト, Ελληνικά, emoji 🙂👍🏽 done",
         "tabs\tand\nnewlines\r\n  spaces   ", "12345 + 0.5 = 12345.5", "", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("pre", ["smollm", "gpt2", "bos"])
@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(imported_tokenizers, pre, text):
    tok = Tokenizer(imported_tokenizers[pre])
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < VOCAB for i in ids)
    assert tok.decode(ids) == text
    # without merges and specials, byte-level BPE is the UTF-8 bytes; merges only shorten it
    assert len(ids) <= len(text.encode())


def test_tokenizer_merges_and_pre_tokenizers(imported_tokenizers):
    smollm, gpt2 = Tokenizer(imported_tokenizers["smollm"]), Tokenizer(imported_tokenizers["gpt2"])
    assert smollm.vocab_size == VOCAB
    for tok in (smollm, gpt2):
        assert tok.encode(" the", add_special_tokens=False) == [ID["Ġthe"]]
        assert tok.encode("the and", add_special_tokens=False) == [byte_id("t"), ID["he"], ID["Ġand"]]
        assert tok.encode("é", add_special_tokens=False) == [ID["Ã©"]]
        assert tok.encode(" café", add_special_tokens=False) == [ID["ĠcafÃ©"]]
        assert tok.encode("<|im_start|>in<|im_end|>", add_special_tokens=False) == [
            ID["<|im_start|>"], ID["in"], ID["<|im_end|>"]]
    # 'smollm' splits every digit before BPE (no "12" token); gpt2's pattern keeps " 12" together
    assert smollm.encode(" 12", add_special_tokens=False) == [byte_id(" "), byte_id("1"), byte_id("2")]
    assert gpt2.encode(" 12", add_special_tokens=False) == [byte_id(" "), ID["12"]]
    assert smollm.encode("12", add_special_tokens=False) == [byte_id("1"), byte_id("2")]
    assert gpt2.encode("12", add_special_tokens=False) == [ID["12"]]


def test_tokenizer_bos_and_chat_template(imported_tokenizers):
    plain, bos = Tokenizer(imported_tokenizers["smollm"]), Tokenizer(imported_tokenizers["bos"])
    assert plain.encode(" the") == [ID["Ġthe"]]
    assert bos.encode(" the") == [ID["<|im_start|>"], ID["Ġthe"]]
    ids = plain.apply_chat_template("the")
    assert ids == [ID["<|im_start|>"], *[byte_id(c) for c in "user"], byte_id("\n"), byte_id("t"), ID["he"],
                   ID["<|im_end|>"], byte_id("\n"), ID["<|im_start|>"], *[byte_id(c) for c in "assistant"],
                   byte_id("\n")]
    cfg = json.loads((imported_tokenizers["smollm"] / "config.json").read_text())
    assert cfg["bos_token_id"] == ID["<|im_start|>"]
    # generation stops at the file's EOS and at the chat template's end-of-turn marker
    assert sorted(cfg["eos_token_id"]) == [ID["<|endoftext|>"], ID["<|im_end|>"]]
    tcfg = json.loads((imported_tokenizers["smollm"] / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == CHAT_TEMPLATE and tcfg["bos_token"] == "<|im_start|>"
