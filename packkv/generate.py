"""`python -m packkv.generate`: load a Llama model, prefill a prompt, decode with a KV cache, stream text.

Reading order: sampling, the engine (model + tokenizer + device), the generation loop, the command line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from packkv.backend import Backend, get_backend
from packkv.cache import CacheShape, KVCache, make_cache
from packkv.errors import PackkvError
from packkv.kernels import model_ops
from packkv.model import Llama, LlamaConfig
from packkv.options import add_cache_arguments, cache_params
from packkv.weights import Tokenizer, load_checkpoint
from packkv.weights.default import cache_dir, default_weights_folder
from packkv.weights.gguf_import import import_gguf
from packkv.weights.random import RandomTensors, random_config

PREFILL_CHUNK = 512   # prompt tokens per forward pass: bounds the [chunk, context] score matrix


# ---- sampling ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0 = greedy
    top_k: int = 0                # 0 = no limit
    top_p: float = 1.0            # nucleus mass kept, in (0, 1]
    seed: int | None = None

    def __post_init__(self):
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise PackkvError(f"--temp must be a finite number >= 0 (0 is greedy), not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PackkvError(f"--top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise PackkvError(f"--top-k must be >= 0 (0 keeps every token), not {self.top_k}")


class Sampler:
    def __init__(self, params: SamplingParams, backend: Backend):
        self.params, self.backend = params, backend
        self.rng = np.random.default_rng(params.seed)

    @property
    def greedy(self) -> bool:
        return self.params.temperature == 0

    def __call__(self, logits) -> int:
        """logits: fp32 [vocab] on the device -> the next token id."""
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())            # argmax on the device: one int crosses, not the vocab
        scaled = self.backend.to_numpy(logits).astype(np.float64) / p.temperature
        if 0 < p.top_k < scaled.size:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled[scaled < kth] = -np.inf
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.top_p < 1:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cumulative, p.top_p)) + 1]  # smallest set reaching top_p
            kept = np.zeros_like(probs)
            kept[keep] = probs[keep]
            probs = kept / kept.sum()
        return int(self.rng.choice(probs.size, p=probs))


# ---- the engine -------------------------------------------------------------------------------------

def resolve_weights(weights: str | None, progress=tqdm) -> Path:
    """A Hugging Face folder as given, a .gguf file imported once into the cache folder, or the default."""
    if weights is None:
        return default_weights_folder(progress)
    path = Path(weights)
    if path.suffix == ".gguf":
        folder = cache_dir() / path.stem
        return folder if (folder / "config.json").is_file() else import_gguf(path, folder, progress=progress)
    return path


class Engine:
    """A model on a device with its tokenizer: what generation and evaluation need."""

    def __init__(self, weights: str | None = None, device: str = "auto", max_context: int | None = None,
                 random_weights: str | None = None):
        """Real weights from `weights` (or the default model), or, with `random_weights` (a preset name or a
        config.json), random weights of that shape made on the device, with no tokenizer (benchmarks)."""
        self.backend = get_backend(device)
        if random_weights:
            self.config = random_config(random_weights)
            tensors = RandomTensors(self.config, self.backend.xp, self.backend.dtype)
            self.tokenizer = None
        else:
            folder = resolve_weights(weights)
            self.config, tensors = load_checkpoint(folder)
            self.tokenizer = Tokenizer(folder)
        limit = self.config.max_position_embeddings
        if max_context is not None and not 0 < max_context <= limit:
            raise PackkvError(f"--max-context must be in 1..{limit} (the model's max_position_embeddings), "
                              f"not {max_context}")
        self.max_context = max_context or limit
        self.model = Llama(self.config, tensors, self.backend, max_context=self.max_context)

    def new_cache(self, kind: str, batch: int, tokens: int, **params) -> KVCache:
        c: LlamaConfig = self.config
        if tokens > self.max_context:     # the RoPE tables (and the model's training) end there
            raise PackkvError(f"a cache of {tokens} tokens is longer than the context of {self.max_context} "
                              f"tokens (raise --max-context, up to the model's {c.max_position_embeddings})")
        shape = CacheShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, batch, tokens)
        return make_cache(kind, shape, self.backend, **params)

    def prompt_ids(self, text: str, chat: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(text) if chat else self.tokenizer.encode(text)
        if not ids:
            raise PackkvError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise PackkvError(f"the prompt has {len(ids)} tokens, which leaves no room in the context of "
                              f"{self.max_context} tokens (shorten it or raise --max-context)")
        return ids


# ---- decode steps ------------------------------------------------------------------------------------

class EagerDecoder:
    """One decode step as plain calls: the CPU path, and caches whose attention is not capturable."""

    def __init__(self, engine: Engine, cache: KVCache):
        self.engine, self.cache = engine, cache

    def step(self, token_ids):
        """token_ids: one int per sequence -> logits [B, 1, vocab], the tokens committed to the cache."""
        return self.engine.model.forward(np.asarray(token_ids).reshape(-1, 1), self.cache)


class GraphDecoder:
    """One decode step captured once as a CUDA graph and replayed: the whole model (about ten kernels
    per layer) costs one launch of host time. What changes between steps lives in device memory the
    graph reads: the input token ids (a static buffer) and the cache's lengths. The graph is captured
    again only when a buffer it baked in has moved (cache.layout_version changes).

    The graph ends with the greedy choice (argmax of the last logits) written into its own input buffer,
    so greedy steps chain on the device: greedy_steps runs up to PIPELINE_DEPTH steps ahead of the host,
    which reads each step's tokens (and commits them to the cache) while the next steps already run."""

    # Steps in flight while the host commits one: three keep the GPU busy through a host pause of up to
    # three steps (a compress event's start: 2-3 ms of host time against SmolLM2's ~1 ms steps).
    PIPELINE_DEPTH = 3

    def __init__(self, engine: Engine, cache: KVCache):
        import cupy
        self.engine, self.cache, self.cupy = engine, cache, cupy
        self.tokens = cupy.zeros((cache.shape.batch, 1), dtype=np.int32)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.graph = self.logits = None
        self.layout_version = None

    def capture(self) -> None:
        cupy, model = self.cupy, self.engine.model
        # The graph's temporaries come from a pool of its own that nothing else allocates from, so no
        # later allocation can land on memory a replay writes to.
        self.pool = cupy.cuda.MemoryPool()
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
            model.forward_step(self.tokens, self.cache)      # compiles and loads every kernel first
            self.stream.synchronize()
            self.stream.begin_capture()
            self.logits = model.forward_step(self.tokens, self.cache)
            model_ops.argmax_rows(self.logits[:, -1], out=self.tokens.reshape(-1))   # the next greedy input
            self.graph = self.stream.end_capture()
        self.layout_version = self.cache.layout_version

    def launch(self, after_host_writes: bool = True) -> None:
        """Enqueue one step on the decoder's stream (captured again first if the cache's buffers moved).
        after_host_writes: the host may have uploaded since the last step (token ids, the cache's
        counters, a compress event): they go through the default stream, and a copy from pageable memory
        may still be in flight when the call returns, so the step (and a capture's warm-up) waits for them."""
        if after_host_writes:
            self.stream.wait_event(self.cupy.cuda.get_current_stream().record())
        if self.layout_version != self.cache.layout_version:
            self.capture()
        self.graph.launch(self.stream)

    def step(self, token_ids):
        self.cache.check_room(1)
        self.tokens.set(np.asarray(token_ids, dtype=np.int32).reshape(-1, 1))
        self.launch()
        self.stream.synchronize()
        self.cache.advance(1)
        return self.logits

    def greedy_steps(self, token_ids):
        """Greedy decoding from token_ids (one per sequence), pipelined: yields each step's chosen ids,
        committed to the cache. Steps n + 1 .. n + PIPELINE_DEPTH are enqueued before step n's ids are
        read (their inputs are already on the device, and the cache's device counters advance in stream
        order behind each step). When the commit of step n reorganises the cache (compressed blocks), the
        cache enqueues that commit's device work behind step n (commit_ahead) and the steps after it read
        the cache as the commit leaves it; when it cannot (its records need the arena to grow, or hold
        NaN), the pipeline drains to step n first. Closing the generator (or an error in a commit) waits
        for the steps still in flight; steps not committed leave no trace (the device counters are reset
        from the host's), but a commit already done ahead is kept (cache.catch_up)."""
        import cupyx
        cache, stream = self.cache, self.stream
        self.tokens.set(np.asarray(token_ids, dtype=np.int32).reshape(-1, 1))
        slots = self.PIPELINE_DEPTH + 1           # a slot per step in flight (the one being read included)
        chosen = cupyx.empty_pinned((slots, cache.shape.batch), dtype=np.int32)
        in_flight, launched, committed = [], 0, 0

        def enqueue(after_host_writes: bool):
            nonlocal launched
            launched += 1                 # first: whatever fails below, the step may have been counted
            self.launch(after_host_writes)
            with stream:
                for counter in cache.device_counters():
                    model_ops.add_one(counter)
            slot = launched % slots
            self.tokens.reshape(-1).get(stream=stream, out=chosen[slot], blocking=False)
            in_flight.append((slot, stream.record()))

        try:
            while True:
                if not in_flight:         # the start, or drained for a commit that uploaded
                    cache.check_room(1)
                    enqueue(after_host_writes=True)
                # step n (the next to commit) and up to PIPELINE_DEPTH after it
                while len(in_flight) <= self.PIPELINE_DEPTH and (
                        cache.may_run_ahead(len(in_flight))
                        or cache.commit_ahead(len(in_flight), stream) and cache.may_run_ahead(len(in_flight))):
                    enqueue(after_host_writes=False)   # nothing uploaded since the steps in flight
                slot, done = in_flight.pop(0)
                done.synchronize()
                ids = chosen[slot].tolist()
                cache.advance(1, counted_on_device=True)   # may refuse (NaN, inf in a block): not committed
                committed += 1
                yield ids
        finally:
            stream.synchronize()
            if launched != committed:   # steps counted on the device but not committed: the host's counts
                cache.catch_up()
                cache.upload_counters()


def make_decoder(engine: Engine, cache: KVCache, use_graph: bool = True):
    from packkv.kernels.model_ops import MAX_ROWS     # beyond it the matmuls need cuBLAS, not capturable
    if use_graph and engine.backend.is_gpu and cache.graph_capturable and cache.shape.batch <= MAX_ROWS:
        return GraphDecoder(engine, cache)
    return EagerDecoder(engine, cache)


def decode_steps(decoder, sampler: Sampler, token_ids: list[int]):
    """The ids every following step chooses (one per sequence), from the last ids of the prompts on:
    greedy on a captured graph runs pipelined on the device, anything else steps and samples in turn.
    Close the generator (or let it be collected) when done."""
    if isinstance(decoder, GraphDecoder) and sampler.greedy:
        yield from decoder.greedy_steps(token_ids)
        return
    while True:
        logits = decoder.step(token_ids)
        token_ids = [sampler(logits[b, -1]) for b in range(len(token_ids))]
        yield token_ids


# ---- generation -------------------------------------------------------------------------------------

@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""
    cache_stats: dict = field(default_factory=dict)
    peak_gpu_bytes: int | None = None

    def stats(self) -> dict:
        decoded = max(len(self.token_ids) - 1, 0)   # the first token comes from the prefill's logits
        return {
            "prompt_tokens": len(self.prompt_ids),
            "prefill_tok_s": len(self.prompt_ids) / self.prefill_seconds if self.prefill_seconds else None,
            "generated_tokens": len(self.token_ids),
            "decode_tok_s": decoded / self.decode_seconds if self.decode_seconds else None,
            "stop_reason": self.stop_reason,
            **self.cache_stats,
            "peak_gpu_bytes": self.peak_gpu_bytes,
        }


def prefill(engine: Engine, ids: list[int], cache: KVCache, show_progress: bool):
    """Run the prompt through the model in chunks; returns the last position's logits."""
    chunks = range(0, len(ids), PREFILL_CHUNK)
    bar = tqdm(total=len(ids), desc="prefill", unit="tok", file=sys.stderr,
               disable=not show_progress or len(ids) <= 2 * PREFILL_CHUNK)
    for start in chunks:
        chunk = ids[start:start + PREFILL_CHUNK]
        logits = engine.model.forward(np.asarray([chunk]), cache)
        bar.update(len(chunk))
    bar.close()
    return logits


def generate(engine: Engine, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
             cache_kind: str = "dense", on_text=None, show_progress: bool = True, stop_at_eos: bool = True,
             use_graph: bool = True, **cache_params) -> Generation:
    """Prefill, then decode up to max_tokens (or EOS, or the context's end), calling on_text(piece) as
    complete UTF-8 text appears. Benchmarks turn stop_at_eos off to decode an exact number of tokens."""
    emit = None if on_text is None else (lambda index, piece: on_text(piece))
    return generate_batch(engine, [prompt_ids], max_tokens, sampling, cache_kind, emit, show_progress,
                          stop_at_eos, use_graph, **cache_params)[0]


def generate_batch(engine: Engine, prompts: list[list[int]], max_tokens: int, sampling: SamplingParams,
                   cache_kind: str = "dense", on_text=None, show_progress: bool = True, stop_at_eos: bool = True,
                   use_graph: bool = True, **cache_params) -> list[Generation]:
    """Generate for several prompts of different lengths at once: each is prefilled alone into its row
    of one cache, then all decode together, one launch per kernel for the whole batch. A sequence that
    has stopped rides along (its tokens are dropped) until every sequence has. on_text(index, piece)."""
    if max_tokens < 1:
        raise PackkvError(f"--max-tokens must be >= 1, not {max_tokens}")
    tokens_needed = min(max(map(len, prompts)) + max_tokens, engine.max_context)
    cache = engine.new_cache(cache_kind, batch=len(prompts), tokens=tokens_needed, **cache_params)
    sampler, backend = Sampler(sampling, engine.backend), engine.backend
    eos = set(engine.config.eos_token_ids) if stop_at_eos else set()
    results = [Generation(prompt_ids=list(ids)) for ids in prompts]
    streams = [engine.tokenizer.stream_decoder() if engine.tokenizer else None for _ in prompts]
    emit = on_text or (lambda index, piece: None)

    next_ids = []
    for b, (ids, result) in enumerate(zip(prompts, results)):
        start = time.perf_counter()
        next_ids.append(sampler(prefill(engine, ids, cache.row(b), show_progress)[0, -1]))
        result.prefill_seconds = time.perf_counter() - start

    steps = decode_steps(make_decoder(engine, cache, use_graph), sampler, next_ids)
    start = time.perf_counter()
    running = set(range(len(prompts)))
    while True:
        for b in sorted(running):
            result = results[b]
            result.token_ids.append(next_ids[b])
            if next_ids[b] in eos:
                result.stop_reason = "eos"
            elif len(result.token_ids) >= max_tokens:
                result.stop_reason = "max_tokens"
            elif int(cache.lengths[b]) >= cache.shape.max_context:
                result.stop_reason = "context_full"
            if streams[b] and next_ids[b] not in eos:
                emit(b, streams[b].push(next_ids[b]))
            if result.stop_reason:
                running.discard(b)
        if not running or int(cache.lengths.max()) >= cache.shape.max_context:
            break
        next_ids = next(steps)
    steps.close()
    backend.synchronize()
    decode_seconds = time.perf_counter() - start
    stats = cache.stats()
    for b, result in enumerate(results):
        result.stop_reason = result.stop_reason or "context_full"
        result.decode_seconds = decode_seconds
        if streams[b]:
            emit(b, streams[b].flush())
            result.text = engine.tokenizer.decode([t for t in result.token_ids if t not in eos])
        result.cache_stats = stats
        result.peak_gpu_bytes = backend.peak_memory_bytes()
    return results


# ---- command line -----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m packkv.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="Hugging Face Llama folder or .gguf file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--random-weights", metavar="NAME|CONFIG",
                    help="random weights of a real shape instead (llama-3.1-8b, llama-2-7b, tinyllama-1.1b, smollm2-135m or a "
                         "config.json), made on the device; the prompt is --prompt-tokens random token ids")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length with --random-weights")
    prompt = ap.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="The capital of France is")
    prompt.add_argument("--prompt-file", help="read the prompt from this file")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--max-context", type=int, help="longest sequence, prompt included (default: the model's)")
    ap.add_argument("--json", help="write the text, token ids and stats to this file")
    add_cache_arguments(ap)
    return ap.parse_args(argv)


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PackkvError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from exc


def format_stats(s: dict) -> str:
    def rate(x):
        return "n/a" if x is None else f"{x:.1f}"

    line = (f"prompt {s['prompt_tokens']} tok, prefill {rate(s['prefill_tok_s'])} tok/s | "
            f"generated {s['generated_tokens']} tok, decode {rate(s['decode_tok_s'])} tok/s | "
            f"KV cache ({s['cache']}) {s['kv_bytes_used'] / 2**20:.2f} MiB used, "
            f"{s['kv_bytes_reserved'] / 2**20:.2f} MiB reserved")
    if s.get("bits_per_element") is not None:
        line += f", {s['compression_ratio']:.2f}x vs fp16, {s['bits_per_element']:.2f} bits/element"
    if s["peak_gpu_bytes"] is not None:
        line += f" | peak GPU memory {s['peak_gpu_bytes'] / 2**20:.0f} MiB"
    return line


def run(args) -> Generation:
    # every check of the arguments before the (slow) model load
    sampling = SamplingParams(args.temp, args.top_k, args.top_p, args.seed)
    kv_params = cache_params(args)
    prompt = None if args.random_weights else read_prompt(args)
    engine = Engine(args.weights, args.device, args.max_context, random_weights=args.random_weights)
    if args.random_weights:
        ids = np.random.default_rng(args.seed).integers(engine.config.vocab_size, size=args.prompt_tokens).tolist()
        if not 0 < len(ids) < engine.max_context:
            raise PackkvError(f"--prompt-tokens must be in 1..{engine.max_context - 1}, not {args.prompt_tokens}")
    else:
        ids = engine.prompt_ids(prompt, args.chat)

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(engine, ids, args.max_tokens, sampling, args.cache, on_text=write, **kv_params)
    sys.stdout.write(("token ids: " + " ".join(map(str, result.token_ids)) if engine.tokenizer is None else "") + "\n")
    stats = result.stats()
    print(format_stats(stats), file=sys.stderr)
    if args.json:
        record = {"text": result.text, "prompt_ids": result.prompt_ids, "token_ids": result.token_ids,
                  "device": engine.backend.device_name, "stats": stats}
        try:
            Path(args.json).write_text(json.dumps(record, indent=2))
        except OSError as exc:
            raise PackkvError(f"cannot write --json {args.json}: {exc}") from exc
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except PackkvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":   # cupy's; its message says how many bytes were asked
            print(f"error: out of GPU memory: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
