"""A foreign model keeps its KV cache in packkv, through DLPack: a tiny PyTorch decoder.

Four pre-norm layers (attention with RoPE and grouped-query attention: 6 query heads over 2 KV heads of
64 channels, then a SiLU MLP) with random weights sample tokens from a 1000-token vocabulary. Each
layer hands its K (after RoPE) and V to a packkv.KVCache as torch tensors and gets attention back as a
torch tensor. On a GPU, CuPy reads torch's memory through DLPack and torch reads packkv's output the
same way: no copies, no host round trips. Beside every call, torch's own attention over the dense K/V
that the layer has appended so far shows what the compression costs. With no usable GPU (or with
--device cpu) the same runs on CPU tensors, which packkv reads through numpy.from_dlpack.

    python examples/foreign_torch_dlpack.py [--device auto|cuda|cpu] [--cache packkv|dense]
                                            [--prompt 256] [--tokens 64] [--rel-k 0.1] [--rel-v 0.2]
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import packkv

LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, VOCAB = 4, 6, 2, 64, 384, 1000


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
        self.o = torch.nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.up = torch.nn.Linear(HIDDEN, 2 * 4 * HIDDEN, bias=False)
        self.down = torch.nn.Linear(4 * HIDDEN, HIDDEN, bias=False)


def rope(x, positions):
    """Rotate channel pairs (i, i + D/2) by position * 10000^(-2i/D): x [B, H, T, D], positions [T]."""
    half = x.shape[-1] // 2
    freq = 10000.0 ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = positions.to(torch.float32)[:, None] * freq[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def torch_attention(q, k, v):
    """torch's own causal attention over dense K/V (float32): the reference the cache is compared with.
    q [B, heads, T, D]; k, v [B, kv_heads, L, D]; the queries are the last T positions."""
    T, L = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril(diagonal=L - T)
    return F.scaled_dot_product_attention(q.float(), k.repeat_interleave(group, 1).float(),
                                          v.repeat_interleave(group, 1).float(), attn_mask=mask)


@torch.no_grad()
def run(device: str = "auto", prompt: int = 256, tokens: int = 64, seed: int = 0, record: bool = False,
        **cache_params) -> dict:
    """Decode `tokens` tokens after a random `prompt`, the KV in a packkv.KVCache (cache_params: kind,
    rel_k, rel_v, window, ...). Returns device, dtype, the generated token ids, max_diff (largest
    |cache attention - torch attention| over every call), max_ref, stats, and with record=True `calls`:
    (layer, q, k, v, out) of every call as NumPy arrays, in the order they happened."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS)).to(device, dtype)
    embed = torch.randn(VOCAB, HIDDEN).to(device, dtype)
    lm_head = (torch.randn(VOCAB, HIDDEN) / math.sqrt(HIDDEN)).to(device, torch.float32)

    # The cache lives where the model does: 'gpu' (CuPy, on torch's current CUDA device) or 'cpu' (NumPy).
    cache = packkv.KVCache(LAYERS, KV_HEADS, HEAD_DIM, max_context=prompt + tokens,
                           device="gpu" if device.startswith("cuda") else "cpu", **cache_params)
    dense_k = [None] * LAYERS          # the reference's own copy of every layer's K and V
    dense_v = [None] * LAYERS
    max_diff, max_ref, calls = 0.0, 0.0, []

    def norm(x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    def forward(ids):                  # ids [1, T] -> logits of the last position
        nonlocal max_diff, max_ref
        T = ids.shape[1]
        positions = torch.arange(cache.length, cache.length + T, device=device)
        h = embed[ids]                                                      # [1, T, HIDDEN]
        for i, layer in enumerate(layers):
            qkv = layer.qkv(norm(h)).view(1, T, HEADS + 2 * KV_HEADS, HEAD_DIM).transpose(1, 2)
            q = rope(qkv[:, :HEADS], positions)                             # [1, heads, T, D]
            k = rope(qkv[:, HEADS:HEADS + KV_HEADS], positions)             # [1, kv_heads, T, D]
            v = qkv[:, HEADS + KV_HEADS:]                                   # a strided view: fine

            cache.append(i, k, v)      # torch tensors straight in (DLPack)
            out = cache.attend(i, q)   # a torch tensor on the same device, in q's dtype

            dense_k[i] = k if dense_k[i] is None else torch.cat([dense_k[i], k], dim=2)
            dense_v[i] = v if dense_v[i] is None else torch.cat([dense_v[i], v], dim=2)
            ref = torch_attention(q, dense_k[i], dense_v[i])
            max_diff = max(max_diff, (out.float() - ref).abs().max().item())
            max_ref = max(max_ref, ref.abs().max().item())
            if record:
                calls.append((i, *(x.cpu().numpy() for x in (q, k, v, out))))

            h = h + layer.o(out.transpose(1, 2).reshape(1, T, HEADS * HEAD_DIM))
            gate, up = layer.up(norm(h)).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        return norm(h[:, -1]).float() @ lm_head.T

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, prompt), generator=generator).to(device)
    generated = []
    for _ in range(tokens):            # the prompt in one step, then one token per step
        probs = torch.softmax(forward(ids).cpu(), dim=-1)
        next_id = int(torch.multinomial(probs, 1, generator=generator))
        generated.append(next_id)
        ids = torch.tensor([[next_id]], device=device)
    result = {"device": device, "dtype": str(dtype), "generated": generated, "max_diff": max_diff,
              "max_ref": max_ref, "stats": cache.stats()}
    if record:
        result["calls"] = calls
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                    help="auto: cuda when torch sees a GPU (packkv uses CuPy's current device, 0 by default)")
    ap.add_argument("--cache", default="packkv", choices=["packkv", "dense"])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (random ids)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate")
    ap.add_argument("--rel-k", type=float, help="relative error bound of K (default: the codec's)")
    ap.add_argument("--rel-v", type=float, help="relative error bound of V (default: the codec's)")
    args = ap.parse_args(argv)
    params = {"kind": args.cache}
    if args.cache == "packkv":
        params.update({k: v for k, v in (("rel_k", args.rel_k), ("rel_v", args.rel_v)) if v is not None})
    r = run(args.device, args.prompt, args.tokens, **params)
    s = r["stats"]
    print(f"torch on {r['device']} ({r['dtype']}), KV in a {s['cache']} cache on {s['device']}")
    print(f"generated {len(r['generated'])} tokens: {r['generated'][:12]} ...")
    print(f"KV cache: {s['length']} tokens, {s['kv_bytes_used']:,} bytes used, {s['kv_bytes_reserved']:,} reserved"
          + (f", {s['compression_ratio']:.2f}x vs fp16 (the fp16 window included)" if s.get("kv_params") else ""))
    print(f"max |cache attention - torch attention over the dense K/V| over every call: {r['max_diff']:.4f} "
          f"(outputs up to {r['max_ref']:.2f})")


if __name__ == "__main__":
    main()
