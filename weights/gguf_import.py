"""Import a llama-architecture GGUF file into a Hugging Face folder that packkv (and transformers) load.

Three things a GGUF file does differently from a Hugging Face checkpoint:
- tensors may be block-quantized (Q4_1, Q8_0, ...): `gguf` dequantizes them; we store fp16;
- llama.cpp's converter permutes the rows of q_proj and k_proj within each head (from the rotate-half
  RoPE layout to interleaved pairs); we undo that, or RoPE would rotate the wrong pairs;
- the tokenizer is metadata (vocabulary, merges, token types, pre-tokenizer name, chat template): we
  rebuild tokenizer.json and tokenizer_config.json from it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from packkv.errors import PackkvError

TENSOR_NAMES = {  # GGUF name -> Hugging Face name ("{i}" is the layer)
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for names we do not know."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    key, layer = ("blk.{i}." + ".".join(parts[2:]), parts[1]) if parts[0] == "blk" else (stem, "")
    hf = TENSOR_NAMES.get(key)
    return hf.format(i=layer) + "." + suffix if hf else None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation: per head, rows were reordered from [first half; second half]
    to interleaved (first[0], second[0], first[1], ...)."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader, tensor_names) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise PackkvError(f"unsupported GGUF architecture {arch!r}: packkv imports llama-architecture files")
    a = "llama."
    heads = _field(reader, a + "attention.head_count")
    hidden = _field(reader, a + "embedding_length")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
        "vocab_size": _field(reader, a + "vocab_size", vocab),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, a + "feed_forward_length"),
        "num_hidden_layers": _field(reader, a + "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, a + "attention.head_count_kv", heads),
        "head_dim": _field(reader, a + "attention.key_length", hidden // heads),
        "rms_norm_eps": _field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _field(reader, a + "rope.freq_base", 10000.0),
        "max_position_embeddings": _field(reader, a + "context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_token_ids(reader),
    }
    if "rope_freqs.weight" in tensor_names:
        raise PackkvError("this GGUF file scales RoPE with a rope_freqs tensor (Llama 3.1 style), which the "
                          "importer does not translate; pass the model's Hugging Face folder instead")
    scaling = _field(reader, a + "rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _field(reader, a + "rope.scaling.factor")}
    elif scaling not in (None, "none"):
        raise PackkvError(f"unsupported GGUF rope scaling {scaling!r}")
    return config


def eos_token_ids(reader) -> list[int]:
    """The file's EOS, its end-of-turn token, and the chat template's end-of-turn marker: generation stops
    at any of them (a base model's EOS often differs from the marker that ends its chat turns)."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ids = [_field(reader, "tokenizer.ggml.eos_token_id"), _field(reader, "tokenizer.ggml.eot_token_id")]
    template = _field(reader, "tokenizer.chat_template") or ""
    ids += [tokens.index(marker) for marker in ("<|im_end|>", "<|eot_id|>") if marker in template and marker in tokens]
    return sorted({i for i in ids if i is not None})


def build_tokenizer_json(reader) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise PackkvError(f"unsupported GGUF tokenizer model {kind!r}: the importer rebuilds byte-level BPE "
                          "('gpt2') tokenizers; convert this model with transformers and pass its folder")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # StarCoder-style: every digit its own token, then GPT-2's split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "llama-bpe":  # Llama 3's split pattern
        pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = byte_level
    else:
        raise PackkvError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: smollm, llama-bpe, gpt2)")
    tok.decoder = decoders.ByteLevel()
    control, user_defined = 3, 4
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (control, user_defined)])
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def import_gguf(gguf_path, out_dir, progress=None) -> Path:
    """Write config.json, model.safetensors (fp16), tokenizer.json and tokenizer_config.json to out_dir."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise PackkvError(f"GGUF file not found: {gguf_path}")
    try:
        reader = GGUFReader(gguf_path)
    except (OSError, ValueError) as exc:
        raise PackkvError(f"cannot read GGUF file {gguf_path}: {exc}") from exc
    names = {t.name for t in reader.tensors}
    config = gguf_config(reader, names)
    tensors = {}
    for t in (progress or (lambda x, **_: x))(reader.tensors, desc="importing GGUF", unit="tensor"):
        name = hf_tensor_name(t.name)
        if name is None:
            raise PackkvError(f"GGUF tensor {t.name} has no counterpart in a Hugging Face Llama checkpoint")
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w, config["num_attention_heads"])
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(w.astype(np.float16))
    tokenizer_json = build_tokenizer_json(reader)        # refuses unsupported tokenizers before writing
    staging = out_dir.with_name(out_dir.name + ".partial")  # an interrupted import leaves no half folder
    staging.mkdir(parents=True, exist_ok=True)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    bos, eos = config["bos_token_id"], config["eos_token_id"]
    tokenizer_config = {
        "bos_token": tokens[bos] if bos is not None else None,
        "eos_token": tokens[eos[-1]] if eos else None,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "model_max_length": config["max_position_embeddings"],
    }
    (staging / "tokenizer.json").write_text(tokenizer_json)
    (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(staging / "model.safetensors"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir
