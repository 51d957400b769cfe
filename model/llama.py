"""The Llama forward pass: embeddings, RMSNorm, RoPE, GQA attention through a KV cache, SwiGLU, head.

Written once against `xp`. On the GPU weights and matmul activations are fp16; the residual stream,
norms, RoPE angles, softmax (inside the cache's attention) and logits are fp32, where fp16 would lose
precision that the next token depends on. On the CPU everything is fp32.

Layouts: tokens [B, T]; hidden states [B, T, hidden]; per-head tensors [B, heads, T, head_dim], the
layout the cache stores (K post-RoPE).

On the GPU the small per-token operations (RMSNorm, RoPE with the q/k/v split, SiLU * up) run as fused
kernels (kernels/model_ops.cu); the xp code beside each call is their NumPy reference twin and the CPU
path. Positions come from the cache's device-side lengths, so a decode step can be captured in a CUDA
graph and replayed (forward_step does no host work that depends on the step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from packkv.backend import Backend
from packkv.model.config import LlamaConfig

if TYPE_CHECKING:
    from packkv.cache import KVCache

# Decode GEMVs normalise their input themselves up to this hidden size (SmolLM2: 576); beyond it a
# separate rms_norm launch is cheaper than every CTA re-reading the row.
FOLD_NORM_MAX_HIDDEN = 2048


@dataclass
class LayerWeights:
    attn_norm: object          # [hidden] fp32
    wqkv: object               # [(heads + 2 kv_heads) * head_dim, hidden]: q, k, v projections fused
    bqkv: object | None
    wo: object                 # [hidden, heads * head_dim]
    bo: object | None
    mlp_norm: object           # [hidden] fp32
    w_gate_up: object          # [2 * intermediate, hidden]: gate and up fused, one matmul
    b_gate_up: object | None
    w_down: object             # [hidden, intermediate]
    b_down: object | None


class Llama:
    def __init__(self, config: LlamaConfig, tensors: dict[str, np.ndarray], backend: Backend,
                 max_context: int | None = None):
        """`tensors` maps Hugging Face names to arrays (host arrays checked by packkv.weights, or device
        arrays of random weights); they are fused and moved to the device here. RoPE tables cover
        `max_context` positions."""
        self.config, self.backend = config, backend
        xp, dt = backend.xp, backend.dtype
        if backend.is_gpu:
            from packkv.kernels import model_ops
            self.ops = model_ops
        else:
            self.ops = None
        self.max_context = max_context or config.max_position_embeddings

        def dev(name, dtype=dt):
            return xp.asarray(tensors[name].astype(dtype, copy=False))

        def fused(names, dtype=dt):
            return xp.concatenate([dev(n, dtype) for n in names])

        def optional(names):
            return fused(names, np.float32) if names[0] in tensors else None

        self.embed = dev("model.embed_tokens.weight")
        self.layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            qkv = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
            gate_up = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
            self.layers.append(LayerWeights(
                attn_norm=dev(p + "input_layernorm.weight", np.float32),
                wqkv=fused(qkv),
                bqkv=optional([n.replace(".weight", ".bias") for n in qkv]),
                wo=dev(p + "self_attn.o_proj.weight"),
                bo=optional([p + "self_attn.o_proj.bias"]),
                mlp_norm=dev(p + "post_attention_layernorm.weight", np.float32),
                w_gate_up=fused(gate_up),
                b_gate_up=optional([n.replace(".weight", ".bias") for n in gate_up]),
                w_down=dev(p + "mlp.down_proj.weight"),
                b_down=optional([p + "mlp.down_proj.bias"]),
            ))
        self.final_norm = dev("model.norm.weight", np.float32)
        self.lm_head = self.embed if config.tie_word_embeddings else dev("lm_head.weight")
        angles = np.outer(np.arange(self.max_context), config.rope_inverse_frequencies())
        self.rope_cos = xp.asarray(np.cos(angles).astype(np.float32))   # [positions, head_dim / 2]
        self.rope_sin = xp.asarray(np.sin(angles).astype(np.float32))

    def weight_bytes(self) -> int:
        arrays = [self.embed, self.final_norm] + ([] if self.lm_head is self.embed else [self.lm_head])
        arrays += [a for layer in self.layers for a in vars(layer).values() if a is not None]
        return sum(a.nbytes for a in arrays)

    # ---- building blocks ----------------------------------------------------------------------------

    def rms_norm(self, x, weight):
        """x fp32 [..., hidden] -> normalised, scaled, in the matmul dtype."""
        if self.ops:
            return self.ops.rms_norm(self.backend.xp.ascontiguousarray(x), weight, self.config.rms_norm_eps)
        xp = self.backend.xp
        inv_rms = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + np.float32(self.config.rms_norm_eps))
        return (weight * (x * inv_rms)).astype(self.backend.dtype)

    def linear(self, x, weight, bias, residual=None):
        """x [..., in] . weight [out, in]^T (+ bias), or with `residual` (fp32 [..., out]) added to it in
        place. A GEMV kernel for the few rows of a decode step on the GPU (capturable in a CUDA graph,
        unlike cuBLAS through CuPy; it adds into the residual stream itself), the library matmul
        otherwise."""
        if self.decode_rows(x):
            return self.ops.linear_rows(self.backend.xp.ascontiguousarray(x), weight, bias, residual=residual)
        # one 2-D matmul: a [B, T, in] operand would broadcast into B matmuls that each read all the weights
        y = (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(x.shape[:-1] + (weight.shape[0],))
        y = y if bias is None else (y + bias).astype(y.dtype)
        if residual is None:
            return y
        residual += y
        return residual

    def decode_rows(self, x) -> bool:
        """Whether x's rows go through the GEMV kernels (GPU, a decode step's few rows)."""
        return bool(self.ops) and x.size // x.shape[-1] <= self.ops.MAX_ROWS and x.shape[-1] % 8 == 0

    def norm_linear(self, x, norm_weight, weight, bias, swiglu: bool = False):
        """linear(rms_norm(x)) of the fp32 residual stream x; with swiglu, silu(gate) * up of the fused
        gate/up weight. A decode step's rows on the GPU take one GEMV, which also normalises its input
        itself when the hidden size is small (re-reading x in every CTA then costs less than a launch)."""
        if self.decode_rows(x):
            fold = x.shape[-1] <= FOLD_NORM_MAX_HIDDEN
            h = self.backend.xp.ascontiguousarray(x) if fold else self.rms_norm(x, norm_weight)
            return self.ops.linear_rows(h, weight, bias, swiglu=swiglu, norm_weight=norm_weight if fold else None,
                                        eps=self.config.rms_norm_eps)
        y = self.linear(self.rms_norm(x, norm_weight), weight, bias)
        return self.silu_mul(y) if swiglu else y

    def silu_mul(self, gate_up):
        """[..., 2 I] -> SiLU(gate) * up [..., I], computed in fp32."""
        if self.ops:
            return self.ops.silu_mul(gate_up)
        gate_up = gate_up.astype(np.float32)
        gate, up = gate_up[..., :self.config.intermediate_size], gate_up[..., self.config.intermediate_size:]
        return (gate / (1.0 + self.backend.xp.exp(-gate)) * up).astype(self.backend.dtype)

    def rope(self, x, cos, sin):
        """Rotate pairs (i, i + head_dim/2): the Hugging Face 'rotate_half' layout. x [B, H, T, D]."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].astype(np.float32), x[..., half:].astype(np.float32)
        out = self.backend.xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        return out.astype(self.backend.dtype)

    def split_heads_rope(self, qkv, cache: KVCache):
        """qkv [B, T, (heads + 2 kv_heads) * D] -> q, k (rotated at each sequence's positions), v."""
        cfg = self.config
        if self.ops:
            return self.ops.rope_split(qkv, cache.starts, self.rope_cos, self.rope_sin, cfg.num_attention_heads,
                                       cfg.num_key_value_heads, cfg.head_dim)
        B, T, _ = qkv.shape
        positions = cache.positions(T)                              # [B, T]
        cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]   # [B, 1, T, D/2]
        q_end = cfg.num_attention_heads * cfg.head_dim
        kv_width = cfg.num_key_value_heads * cfg.head_dim

        def heads(x, n):  # [B, T, n * D] -> [B, n, T, D]
            return x.reshape(B, T, n, cfg.head_dim).transpose(0, 2, 1, 3)

        q = self.rope(heads(qkv[..., :q_end], cfg.num_attention_heads), cos, sin)
        k = self.rope(heads(qkv[..., q_end:q_end + kv_width], cfg.num_key_value_heads), cos, sin)
        v = heads(qkv[..., q_end + kv_width:], cfg.num_key_value_heads)
        return q, k, v

    def rope_and_append(self, i, qkv, cache: KVCache):
        """q rotated; k rotated and v appended to layer i of the cache. On the GPU, where the cache offers
        fp16 slots for them (append_target), one kernel rotates and writes them there directly."""
        if self.ops:
            target = cache.append_target(i, qkv.shape[1])
            if target is not None:
                cfg = self.config
                return self.ops.rope_split_into_cache(qkv, cache.starts, self.rope_cos, self.rope_sin,
                                                      cfg.num_attention_heads, cfg.num_key_value_heads,
                                                      cfg.head_dim, *target)
        q, k, v = self.split_heads_rope(qkv, cache)
        cache.append(i, k, v)
        return q

    def attention(self, i, layer: LayerWeights, x, cache: KVCache):
        """x += attention(rms_norm(x)): the output projection adds into the residual stream."""
        cfg = self.config
        B, T, _ = x.shape
        q = self.rope_and_append(i, self.norm_linear(x, layer.attn_norm, layer.wqkv, layer.bqkv), cache)
        out = cache.attend(i, q)                                  # [B, heads, T, D]
        out = out.transpose(0, 2, 1, 3).reshape(B, T, cfg.num_attention_heads * cfg.head_dim)
        self.linear(out, layer.wo, layer.bo, residual=x)

    def mlp(self, layer: LayerWeights, x):
        """x += SwiGLU MLP(rms_norm(x)), the down projection adding into the residual stream."""
        act = self.norm_linear(x, layer.mlp_norm, layer.w_gate_up, layer.b_gate_up, swiglu=True)
        self.linear(act, layer.w_down, layer.b_down, residual=x)

    # ---- forward ------------------------------------------------------------------------------------

    def forward(self, tokens, cache: KVCache, all_logits: bool = False):
        """Run T new tokens of each of B sequences through the model, appending their K/V to `cache`,
        and commit them. tokens: int array [B, T]. Returns fp32 logits [B, T, vocab] if all_logits, else
        [B, 1, vocab] for the last position only (what sampling needs; a long prefill skips a
        [T, vocab] matmul)."""
        cache.check_room(np.shape(tokens)[1])
        logits = self.forward_step(tokens, cache, all_logits)
        cache.advance(np.shape(tokens)[1])
        return logits

    def forward_step(self, tokens, cache: KVCache, all_logits: bool = False):
        """forward without committing the tokens to the cache: only device work, no host decisions that
        change from step to step, so a decode step can be captured in a CUDA graph."""
        xp = self.backend.xp
        tokens = xp.asarray(tokens)
        x = self.embed[tokens].astype(np.float32)                   # residual stream, fp32
        for i, layer in enumerate(self.layers):
            self.attention(i, layer, x, cache)
            self.mlp(layer, x)
        if not all_logits:
            x = x[:, -1:]
        return self.linear(self.rms_norm(x, self.final_norm), self.lm_head, None).astype(np.float32)
