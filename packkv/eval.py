"""`python -m packkv.eval SUBCOMMAND`: how much packkv compresses real KV, and what that costs.

    compression   K and V of N tokens of a text, run through the model, compressed with the given
                  parameters: every stored byte counted, per component, K and V apart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from packkv import codec
from packkv.errors import PackkvError
from packkv.generate import PREFILL_CHUNK, Engine
from packkv.options import add_cache_arguments, cache_params

KIVI_SETTINGS = [(2, 32), (2, 64), (4, 32), (4, 64)]   # (bits, group): KIVI's common configurations


# ---- real KV --------------------------------------------------------------------------------------

def text_tokens(engine: Engine, path, tokens: int) -> list[int]:
    """The first `tokens` tokens of a text file (read only as far as needed)."""
    path = Path(path)
    if not path.is_file():
        raise PackkvError(f"--text file not found: {path}")
    chars = tokens * 8
    while True:
        text = path.read_text(encoding="utf-8", errors="replace")[:chars]
        ids = engine.tokenizer.encode(text)
        if len(ids) >= tokens or len(text) < chars:
            break
        chars *= 2
    if len(ids) < tokens:
        raise PackkvError(f"{path} holds {len(ids)} tokens, fewer than the {tokens} asked for")
    return ids[:tokens]


def collect_kv(engine: Engine, ids: list[int]):
    """Run ids through the model with a dense cache: K (post-RoPE) and V of every layer as fp16,
    [layers, kv_heads, tokens, head_dim] each."""
    cache = engine.new_cache("dense", batch=1, tokens=len(ids))
    for start in tqdm(range(0, len(ids), PREFILL_CHUNK), desc="model forward", unit="chunk", file=sys.stderr):
        engine.model.forward(np.asarray([ids[start:start + PREFILL_CHUNK]]), cache)
    to_numpy = engine.backend.to_numpy
    return (to_numpy(cache.k[:, 0, :, :len(ids)]).astype(np.float16),
            to_numpy(cache.v[:, 0, :, :len(ids)]).astype(np.float16))


def as_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """[layers, kv_heads, tokens, D] -> [layers * n_blocks, kv_heads, block, D] (whole blocks only)."""
    L, H, T, D = x.shape
    n = T // block
    return x[:, :, :n * block].reshape(L, H, n, block, D).transpose(0, 2, 1, 3, 4).reshape(L * n, H, block, D)


# ---- sizes ----------------------------------------------------------------------------------------

def measure_compression(k: np.ndarray, v: np.ndarray, params: codec.CodecParams) -> dict:
    """Compress whole blocks of k, v [layers, kv_heads, tokens, D]; every byte of the records counted.
    The record header and padding, shared by K and V, are split half and half between them."""
    kb, vb = as_blocks(k, params.block), as_blocks(v, params.block)
    buffer, offsets, _ = codec.encode_blocks(kb, vb, params)
    parts = codec.byte_breakdown(buffer, offsets)
    assert sum(parts.values()) == buffer.size
    shared = (parts["record_header"] + parts["padding"]) / 2
    k_bytes = shared + sum(n for key, n in parts.items() if key.startswith("k_"))
    v_bytes = shared + sum(n for key, n in parts.items() if key.startswith("v_"))
    table_bytes = 8 * kb.shape[0]               # the cache's block-offset table: one int64 per record
    elements = kb.size                          # per K (and per V)
    fp16_bytes = 2 * 2 * elements
    kv_bytes = buffer.size + table_bytes
    return {
        "fp16_bytes": fp16_bytes, "kv_bytes": kv_bytes, "compression_ratio": fp16_bytes / kv_bytes,
        "bits_per_element": {"k": 8 * (k_bytes + table_bytes / 2) / elements,
                             "v": 8 * (v_bytes + table_bytes / 2) / elements},
        "bytes": {**parts, "offset_table": table_bytes},
        "entropy_bits": zero_order_entropy(kb, vb, params),
        "params": {**vars(params)}, "tokens": kb.shape[0] // k.shape[0] * params.block,
    }


def zero_order_entropy(kb: np.ndarray, vb: np.ndarray, params: codec.CodecParams) -> dict:
    """Shannon entropy (bits) of the quantized levels, per K and V: what an ideal symbol coder would
    spend on the payload alone, headers and per-token parameters not included."""
    levels, _ = codec.quantize_blocks(kb, vb, params)

    def entropy(x):
        counts = np.bincount(x.ravel().astype(np.int64))
        p = counts[counts > 0] / x.size
        return float(-(p * np.log2(p)).sum())

    return {"k": entropy(levels.k_levels), "v": entropy(levels.v_levels)}


def kivi_bits_per_element(bits: int, group: int) -> float:
    """Plain group quantization as KIVI stores it: `bits` per element plus an fp16 scale and an fp16 zero
    per group of `group` elements (K: a channel over `group` tokens; V: a token over `group` channels)."""
    return bits + 2 * 16 / group


# ---- command line ---------------------------------------------------------------------------------

def compression_command(args) -> dict:
    params = cache_params(argparse.Namespace(**{**vars(args), "cache": "packkv"}))["params"]
    engine = Engine(args.weights, args.device)
    k, v = collect_kv(engine, text_tokens(engine, args.text, args.tokens))
    result = measure_compression(k, v, params)
    result["kivi_bits_per_element"] = {f"{b}bit_g{g}": kivi_bits_per_element(b, g) for b, g in KIVI_SETTINGS}
    bits = result["bits_per_element"]
    print(f"{result['tokens']} tokens x {k.shape[0]} layers: {result['compression_ratio']:.2f}x vs fp16, "
          f"K {bits['k']:.3f} bits/element, V {bits['v']:.3f} (entropy of levels: K "
          f"{result['entropy_bits']['k']:.2f}, V {result['entropy_bits']['v']:.2f})")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m packkv.eval", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compression", help="bits per element of real KV, every byte counted")
    comp.add_argument("--weights", help="Hugging Face folder or .gguf (default: SmolLM2-135M-Instruct)")
    comp.add_argument("--text", required=True, help="text file whose first tokens make the KV")
    comp.add_argument("--tokens", type=int, default=2048)
    comp.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    comp.add_argument("--json", help="write the result to this file")
    add_cache_arguments(comp)
    args = ap.parse_args(argv)
    try:
        result = {"compression": compression_command}[args.command](args)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    except PackkvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
