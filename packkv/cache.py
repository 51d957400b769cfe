"""The KV-cache interface and its kinds: dense (fp16) and packkv (compressed blocks + an fp16 window).

A model step with T new tokens per sequence does, for every layer i:
    cache.append(i, k, v)      # k, v [B, kv_heads, T, head_dim], K after RoPE
    out = cache.attend(i, q)   # q [B, heads, T, head_dim]: attention over everything cached, causal
and then, once, `cache.advance(T)`: the new tokens become part of every sequence. A cache that compresses
does its block work in `advance`, for all layers at once, never inside the per-layer calls.

Sequences of one batch may have different lengths; `positions(T)` gives each new token's position.
Every cache reports the bytes it holds (`bytes_used`) and the bytes it has set aside (`bytes_reserved`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import contextlib
import copy
import time
from dataclasses import dataclass, replace

import numpy as np

from packkv import codec
from packkv.attention import causal_attention, causal_mask
from packkv.backend import Backend, out_of_memory_error
from packkv.errors import PackkvError


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    batch: int
    max_context: int


class KVCache(ABC):
    """What every kind shares: per-sequence lengths, positions, and the stats line."""

    kind = "abstract"
    # Whether a decode step over this cache can be captured in a CUDA graph (its append and attend are
    # kernels reading lengths from device memory), and a counter that changes whenever a buffer such a
    # graph bakes in moves (so the graph must be captured again).
    graph_capturable = False
    layout_version = 0
    # Attributes that hold one entry per sequence, and the axis of the sequence: row(b) slices them.
    per_sequence = {"lengths": 0, "starts": 0}

    def __init__(self, shape: CacheShape, backend: Backend):
        self.shape, self.backend = shape, backend
        self.lengths = np.zeros(shape.batch, dtype=np.int64)   # committed tokens per sequence (host)
        self.pending = 0                                         # tokens appended this step, not yet committed
        # The same lengths on the device: kernels read each sequence's next position from here, so a
        # captured decode step replays correctly as sequences grow.
        self.starts = backend.xp.zeros(shape.batch, dtype=np.int32)

    def row(self, b: int) -> "KVCache":
        """Sequence b as a batch-1 cache sharing this one's memory (views of its per-sequence state): a
        batch's sequences are prefilled one by one through their rows, then decoded together. Every
        per-sequence update is in place, so the views stay views."""
        view = copy.copy(self)
        view.shape = replace(self.shape, batch=1)
        for name, axis in self.per_sequence.items():
            index = (slice(None),) * axis + (slice(b, b + 1),)
            setattr(view, name, getattr(self, name)[index])
        return view

    def check_room(self, new_tokens: int) -> None:
        """Refuse to grow any sequence past max_context."""
        longest = int(self.lengths.max()) + new_tokens
        if longest > self.shape.max_context:
            raise PackkvError(f"the sequence would reach {longest} tokens, more than the cache's context of "
                              f"{self.shape.max_context} (raise --max-context, up to the model's limit)")

    def positions(self, new_tokens: int):
        """[B, T] positions of the next T tokens of every sequence."""
        return self.backend.xp.asarray(self.lengths[:, None] + np.arange(new_tokens)[None, :])

    def check_append(self, layer: int, k, v) -> int:
        s = self.shape
        expected = (s.batch, s.kv_heads, k.shape[2], s.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"append(layer {layer}): k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                             f"[batch, kv_heads, T, head_dim] = {expected}")
        return self.count_pending(layer, k.shape[2])

    def count_pending(self, layer: int, T: int) -> int:
        """Note T new tokens of `layer` (every layer appends as many as layer 0 did)."""
        if not 0 <= layer < self.shape.layers:
            raise ValueError(f"append: layer {layer} is outside 0..{self.shape.layers - 1}")
        if layer == 0:
            self.pending = T
        elif T != self.pending:
            raise ValueError(f"append(layer {layer}): {T} tokens, but layer 0 appended {self.pending}")
        return T

    def append_target(self, layer: int, T: int):
        """Instead of append: where a kernel may write this step's T tokens of k and v itself (the model's
        RoPE kernel does, saving the append's launch): fp16_slots(layer), the tokens counted as appended;
        or None (nothing counted) when the kind must see k and v: then call append."""
        if not self.kv_stored_as_given():
            return None
        self.count_pending(layer, T)
        return self.fp16_slots(layer)

    def kv_stored_as_given(self) -> bool:
        """Whether append stores k and v unchanged, in fp16_slots on the GPU that a kernel could fill
        itself (not so for a subclass whose own append must see them)."""
        return False

    def fp16_slots(self, layer: int):
        """(k slices, v slices [B, kv_heads, capacity, head_dim] fp16, device int32 token offset per
        sequence) where append writes layer `layer`'s new tokens (kinds whose kv_stored_as_given)."""
        raise NotImplementedError(f"the {type(self).__name__} cache has no fp16 slots")

    @abstractmethod
    def append(self, layer: int, k, v) -> None:
        """Store this step's k, v [B, kv_heads, T, head_dim] of one layer (check them with check_append)."""

    @abstractmethod
    def attend(self, layer: int, q):
        """q [B, heads, T, head_dim] -> attention over everything cached, this step's tokens causally."""

    @abstractmethod
    def bytes_used(self) -> int:
        """Every byte the committed tokens occupy."""

    @abstractmethod
    def bytes_reserved(self) -> int:
        """Every byte set aside, used or not."""

    def advance(self, new_tokens: int, counted_on_device: bool = False) -> None:
        """Commit this step's tokens. counted_on_device: the device's counters (device_counters) were
        already advanced in stream order, by a pipelined decode, and must not be uploaded over."""
        self.lengths += new_tokens
        self.pending = 0
        if not counted_on_device:
            self.upload_counters()

    def upload_counters(self) -> None:
        """Set the device mirrors of the host bookkeeping (lengths) from the host's values."""
        set_device_array(self.starts, self.lengths)

    def device_counters(self) -> list:
        """The device arrays that grow by exactly one per committed decode token (while no compressed
        block is committed): a pipelined decode adds one to them on the device instead of uploading them."""
        return [self.starts]

    def reorganises_within(self, steps: int) -> bool:
        """Whether one of the next `steps` one-token commits would reorganise the cache (commit compressed
        blocks): then no step after it may already be in flight, since the device state it reads changes."""
        return False

    def commit_ahead(self, in_flight: int, stream=None) -> bool:
        """Let a pipelined decode run on past a commit: when the advance of the last of the `in_flight`
        steps launched would commit compressed blocks, enqueue that commit's device work on `stream` now
        (behind those steps, which read the cache as it was; the steps launched after it read it as the
        commit leaves it) and return True: that advance then does only the host's bookkeeping. False when
        there is no such commit or it cannot be done ahead. This kind never reorganises."""
        return False

    def catch_up(self) -> None:
        """A pipelined decode stopped short of a step whose commit it did ahead: commit it on the host now
        (the device already has), as a prefill would have."""

    def may_run_ahead(self, in_flight: int = 1) -> bool:
        """Whether a pipelined decode may launch another step while `in_flight` steps are launched and not
        yet committed: their commits leave the device counters to the increments, and every one of their
        tokens and the new step's fits."""
        return (not self.reorganises_within(in_flight)
                and int(self.lengths.max()) + in_flight + 1 <= self.shape.max_context)

    def fp16_bytes(self) -> int:
        """What the committed tokens take as plain fp16 K and V: the yardstick of compression."""
        s = self.shape
        return int(self.lengths.sum()) * s.layers * s.kv_heads * s.head_dim * 2 * 2

    def stats(self) -> dict:
        used = self.bytes_used()
        return {"cache": self.kind, "kv_bytes_used": used, "kv_bytes_reserved": self.bytes_reserved(),
                "compression_ratio": self.fp16_bytes() / used if used else None}


class DenseCache(KVCache):
    """K and V as they come (fp16 on the GPU, fp32 on the CPU), preallocated for max_context tokens."""

    kind = "dense"
    graph_capturable = True
    per_sequence = {**KVCache.per_sequence, "k": 1, "v": 1}

    def __init__(self, shape: CacheShape, backend: Backend):
        super().__init__(shape, backend)
        xp = backend.xp
        dims = (shape.layers, shape.batch, shape.kv_heads, shape.max_context, shape.head_dim)
        nbytes = 2 * int(np.prod(dims)) * np.dtype(backend.dtype).itemsize
        try:
            self.k = xp.zeros(dims, dtype=backend.dtype)
            self.v = xp.zeros(dims, dtype=backend.dtype)
        except (MemoryError, _gpu_oom_type()) as exc:
            raise out_of_memory_error(nbytes, f"the dense KV cache for {shape.max_context} tokens") from exc

    def append(self, layer: int, k, v) -> None:
        self.check_append(layer, k, v)
        append_at(self.backend, k, v, self.k[layer], self.v[layer], self.lengths, self.starts)

    def kv_stored_as_given(self) -> bool:
        return self.backend.is_gpu and type(self).append is DenseCache.append

    def fp16_slots(self, layer: int):
        return self.k[layer], self.v[layer], self.starts

    def attend(self, layer: int, q):
        if self.backend.is_gpu and self.pending == 1:      # decode: the flash-decoding kernel
            from packkv.kernels.dense_attention import dense_decode_attention
            out = dense_decode_attention(q[:, :, 0], self.k[layer], self.v[layer], self.starts, extra=1)
            return out[:, :, None]
        key_lengths = self.lengths + self.pending
        end = int(key_lengths.max())
        if layer == 0:  # one mask per step, shared by every layer (layer 0 attends first)
            self.step_mask = causal_mask(self.backend.xp, key_lengths, self.pending, end)
        return causal_attention(self.backend.xp, q, self.k[layer, :, :, :end], self.v[layer, :, :, :end],
                                self.step_mask)

    def bytes_per_token(self) -> int:
        s = self.shape
        return 2 * s.layers * s.kv_heads * s.head_dim * np.dtype(self.backend.dtype).itemsize

    def bytes_used(self) -> int:
        return int(self.lengths.sum()) * self.bytes_per_token()

    def bytes_reserved(self) -> int:
        return self.shape.batch * self.shape.max_context * self.bytes_per_token()


class ByteArena:
    """Append-only storage for variable-sized compressed records (a bump allocator over one uint8 array).

    Records never change once written. When the arena is full it doubles (one copy, the only time a
    record moves), so a growing sequence never fragments memory. Records stay 16-byte aligned (codec
    records are multiples of 16 bytes), and 16 bytes of slack follow the last one, for decoders that
    load a word past a record's end."""

    SLACK = 16
    # Sizes are rounded up to what the device really sets aside, so that capacity (and bytes_reserved)
    # is memory held, not memory asked for: CuPy's pool hands out multiples of 512 bytes, and the driver
    # maps large allocations in 2 MiB pages (an unrounded 2.8 GB arena held 611 KB more than it said).
    # The NumPy path rounds alike, so that both report the same bytes for the same cache.
    SMALL_GRANULE, LARGE_GRANULE = 512, 2 << 20

    def __init__(self, xp, capacity: int):
        self.xp, self.used = xp, 0
        self.data = self._allocate(max(capacity, 4096))
        # The data's address, in memory of the data's kind: decode kernels read it from there, so a
        # captured CUDA graph keeps working when the arena grows and moves (no capture again).
        self.address = xp.asarray([self._data_address()], dtype=np.uint64)

    def _data_address(self) -> int:
        return int(self.data.data.ptr) if hasattr(self.data.data, "ptr") else int(self.data.ctypes.data)

    @classmethod
    def allocation_size(cls, nbytes: int) -> int:
        granule = cls.LARGE_GRANULE if nbytes >= cls.LARGE_GRANULE else cls.SMALL_GRANULE
        return -(-nbytes // granule) * granule

    def _allocate(self, nbytes: int):
        nbytes = self.allocation_size(nbytes)
        try:
            return self.xp.zeros(nbytes, dtype=np.uint8)
        except (MemoryError, _gpu_oom_type()) as exc:
            raise out_of_memory_error(nbytes, "growing the compressed KV arena") from exc

    def ensure(self, total: int) -> None:
        """Make room for `total` bytes of records (plus the slack), doubling at least."""
        if total + self.SLACK > self.data.size:
            grown = self._allocate(max(2 * self.data.size, total + self.SLACK))
            grown[:self.used] = self.data[:self.used]
            self.data = grown
            self.address[...] = self._data_address()

    def fits(self, nbytes: int) -> bool:
        """Whether nbytes more of records fit without growing."""
        return self.used + nbytes + self.SLACK <= self.data.size

    @property
    def writable(self):
        """The bytes records may occupy: all but the slack."""
        return self.data[:self.data.size - self.SLACK]

    def append(self, records) -> int:
        """Copy records (uint8, host or device) to the end; returns their start offset."""
        n = int(records.size)
        self.ensure(self.used + n)
        start = self.used
        self.data[start:start + n] = self.xp.asarray(records)
        self.used += n
        return start

    @property
    def capacity(self) -> int:
        return int(self.data.size)


@dataclass
class Compression:
    """A compress event between its start and its commit: due[b] blocks of sequence b (the oldest of its
    window), owners[i] = (layer, sequence, block index) of record i, the records being written, and the
    decode steps committed since it started."""
    due: np.ndarray
    owners: list
    records: object       # BufferedRecords or EncoderRecords: .offsets() at the commit
    steps: int = 0
    ahead: object = None  # its commit's device work was enqueued ahead (commit_ahead): a CUDA event, or True


class BufferedRecords:
    """Records encoded into a buffer of their own (offsets relative to it), copied into the arena when
    the compression commits."""

    def __init__(self, arena: "ByteArena", buffer, offsets: np.ndarray):
        self.arena, self.buffer, self.relative = arena, buffer, offsets
        self.taken = None

    def offsets(self) -> np.ndarray:
        if self.taken is None:
            self.taken = self.arena.append(self.buffer) + self.relative
        return self.taken

    def offsets_ahead(self) -> np.ndarray | None:
        """offsets(), unless the arena would have to grow (a move that steps in flight must not see)."""
        return self.offsets() if self.arena.fits(int(self.buffer.size)) else None


class BlockCache(KVCache, ABC):
    """What the compressing kinds share: the most recent tokens in an fp16 window, older ones as
    immutable blocks of `block` tokens, encoded into variable-sized records in a ByteArena with a table
    of block offsets. A subclass says how a batch of blocks is encoded and decoded (`encode`, `decode`).

    A sequence's window holds between `window` and `window + block - 1` tokens once it is long enough
    (DEFER_STEPS more while a decode step's blocks are being encoded, see below); `advance` encodes each
    full block that falls out of it, for every layer and sequence in one encoder call. A decode step (one
    new token) only starts that encoding: the blocks stay in the window, and attention reads them there as
    fp16, until the advance DEFER_STEPS steps later commits the records (an encoder on the GPU runs
    meanwhile, beside the next steps, instead of stalling them). The commit step is fixed by token counts
    alone, so the CPU and GPU, eager and captured steps attend alike; a step of more tokens (prefill)
    commits what is pending and compresses its own blocks at once. A pipelined decode enqueues a commit's
    device work behind the step that commits it (commit_ahead), so the steps launched after it need not
    wait for the host. Blocks are immutable: no re-compression, ever. A kind may store a block's tokens in
    an order of its own (K and V permuted alike), which attention, a sum over tokens, does not care about;
    they are all older than every window token, so causality only concerns the window.

    Prefill runs in chunks: a chunk attends exactly to itself and the window, and to earlier chunks'
    tokens through their encoded blocks, as decode does.
    """

    per_sequence = {**KVCache.per_sequence, "window_k": 1, "window_v": 1, "window_len": 0, "window_starts": 0,
                    "n_blocks": 0, "device_n_blocks": 0, "block_offsets": 1, "decoded_k": 1, "decoded_v": 1}

    DEFER_STEPS = 8   # decode steps between starting a compress event and committing it

    def __init__(self, shape: CacheShape, backend: Backend, block: int, window: int = 128,
                 max_new_tokens: int = 512, keep_decoded: bool = True):
        super().__init__(shape, backend)
        if window < 0:
            raise PackkvError(f"--kv-window must be >= 0, not {window}")
        xp, s = backend.xp, shape
        self.block, self.window, self.max_new_tokens = block, window, max_new_tokens
        self.window_capacity = window + block + max_new_tokens + self.DEFER_STEPS
        self.in_flight: Compression | None = None     # a decode step's blocks being encoded
        self.defer_steps = self.DEFER_STEPS           # 0: commit at once (a row's view)
        self.refused = False      # the last commit refused its blocks: the next attempt is not deferred
        # an even count keeps every layer's [B, max_blocks] int64 table 16-byte aligned, as kernels want
        self.max_blocks = -(-s.max_context // block) + (-(-s.max_context // block)) % 2
        dims = (s.layers, s.batch, s.kv_heads, self.window_capacity, s.head_dim)
        try:
            self.window_k = xp.zeros(dims, dtype=np.float16)
            self.window_v = xp.zeros(dims, dtype=np.float16)
            self.block_offsets = xp.zeros((s.layers, s.batch, self.max_blocks), dtype=np.int64)
            # a decode step's compress event (a block per sequence at most) gathers its blocks here, so
            # that decoding allocates nothing: [layers * batch, kv_heads, block, D], layer-major per sequence
            staging = (s.layers * s.batch, s.kv_heads, block, s.head_dim)
            self.staging_k, self.staging_v = xp.empty(staging, np.float16), xp.empty(staging, np.float16)
        except (MemoryError, _gpu_oom_type()) as exc:
            raise out_of_memory_error(2 * np.prod(dims) * 2, "the KV cache's fp16 window") from exc
        # host seconds spent on compress events, and their count: one object that row() views share, so
        # a batch's stats include what its rows' prefills compressed
        self.compression_totals = {"seconds": 0.0, "events": 0}
        self.window_len = np.zeros(s.batch, dtype=np.int64)
        self.window_starts = xp.zeros(s.batch, dtype=np.int32)   # window_len on the device
        self.n_blocks = np.zeros(s.batch, dtype=np.int64)
        self.device_n_blocks = xp.zeros(s.batch, dtype=np.int32)  # n_blocks on the device
        # Start the arena at a sixth of what fp16 would take for a full context (about what packkv's
        # default bounds achieve); it doubles when a sequence compresses worse than that.
        self.arena = ByteArena(xp, s.batch * s.max_context * self.token_fp16_bytes() // 6)
        # The reference path (keep_decoded) decodes each block once, when it is written, and attends over
        # the decoded copy, without re-decoding the whole history every step. It is not counted in
        # bytes_used: it stands in for decoding in registers, which a kind's GPU kernels do instead.
        self.keep_decoded = keep_decoded
        decoded = (s.layers, s.batch, s.kv_heads, self.max_blocks * block if keep_decoded else 0, s.head_dim)
        self.decoded_k, self.decoded_v = xp.zeros(decoded, backend.dtype), xp.zeros(decoded, backend.dtype)

    @abstractmethod
    def encode(self, k_blocks: np.ndarray, v_blocks: np.ndarray, params=None, token_rel=None):
        """[n, kv_heads, block, head_dim] fp16 arrays of the backend -> (uint8 records of the backend,
        int64 host offsets [n + 1]), with `params` (encoding_groups' choice) or, when None, the kind's own,
        and token_rel (encoding_groups' per-token bounds, if the kind has any)."""

    @abstractmethod
    def decode(self, buffer, offsets):
        """encode's output -> (k_hat, v_hat) [n, kv_heads, block, head_dim], in storage order."""

    @abstractmethod
    def kind_params(self) -> dict:
        """The parameters that the stats report."""

    def token_fp16_bytes(self) -> int:
        s = self.shape
        return s.layers * s.kv_heads * s.head_dim * 2 * 2

    # ---- the per-layer calls --------------------------------------------------------------------

    def append(self, layer: int, k, v) -> None:
        self.check_append(layer, k, v)
        append_at(self.backend, k, v, self.window_k[layer], self.window_v[layer], self.window_len,
                  self.window_starts)

    def count_pending(self, layer: int, T: int) -> int:
        if T > self.max_new_tokens:
            raise ValueError(f"append: {T} tokens in one step, the cache was made for at most {self.max_new_tokens}")
        super().count_pending(layer, T)
        if layer == 0 and self.backend.is_gpu:     # the window lengths the decode kernels see, on the device
            self.window_ends = self.window_starts + np.int32(T)
        return T

    def kv_stored_as_given(self) -> bool:
        return self.backend.is_gpu and type(self).append is BlockCache.append

    def fp16_slots(self, layer: int):
        return self.window_k[layer], self.window_v[layer], self.window_starts

    def attend(self, layer: int, q):
        xp, T = self.backend.xp, self.pending
        outs = []
        for b in range(self.shape.batch):   # reference path: one sequence at a time, exact fp32 softmax
            compressed = int(self.n_blocks[b]) * self.block
            recent = int(self.window_len[b]) + T
            k_old, v_old = self.compressed_kv(layer, b)
            dt = q.dtype
            k_all = xp.concatenate([k_old.astype(dt), self.window_k[layer, b, :, :recent].astype(dt)], axis=1)
            v_all = xp.concatenate([v_old.astype(dt), self.window_v[layer, b, :, :recent].astype(dt)], axis=1)
            mask = causal_mask(xp, [compressed + recent], T, compressed + recent)
            outs.append(causal_attention(xp, q[b:b + 1], k_all[None], v_all[None], mask))
        return xp.concatenate(outs, axis=0)

    def compressed_kv(self, layer: int, b: int):
        """K and V of sequence b's compressed blocks in storage order, [kv_heads, tokens, head_dim]."""
        tokens = int(self.n_blocks[b]) * self.block
        if self.keep_decoded:
            return self.decoded_k[layer, b, :, :tokens], self.decoded_v[layer, b, :, :tokens]
        if tokens == 0:
            empty = self.backend.xp.zeros((self.shape.kv_heads, 0, self.shape.head_dim), np.float16)
            return empty, empty
        return self.decompress(self.block_offsets[layer, b, :self.n_blocks[b]])

    def decompress(self, offsets):
        """The blocks whose records start at `offsets` (device int64), as [kv_heads, tokens, head_dim]
        K and V; kinds that do not keep decoded copies decode here."""
        raise PackkvError(f"the {self.kind} cache keeps no decoded copies and has no decoder")

    # ---- once per step --------------------------------------------------------------------------

    def advance(self, new_tokens: int, counted_on_device: bool = False) -> None:
        # A start or commit may refuse (NaN, inf in a block): then the step is not committed, and a commit
        # made before the refusal in this call stands (the windows without this step's tokens).
        window_len = self.window_len + new_tokens
        start = time.perf_counter()
        moved = self.commits_after(new_tokens)
        on_device = True      # whether the device's counters already are what this advance leaves
        if moved:
            on_device = self.in_flight.ahead is not None
            window_len = self.commit(self.in_flight, window_len)
            self.window_len[...] = window_len - new_tokens
        elif self.in_flight is not None:
            self.in_flight.steps += 1
        due = self.due_in(window_len)
        try:
            if self.in_flight is None and due.any():
                compression = self.start_compress(due)
                if new_tokens == 1 and self.defer_steps and not self.refused:
                    self.in_flight = compression
                else:
                    window_len, moved, on_device = self.commit(compression, window_len), True, False
        except Exception:
            if moved:
                self.upload_counters()
            raise
        if moved or (self.in_flight is not None and self.in_flight.steps == 0):   # committed or started
            self.compression_totals["seconds"] += time.perf_counter() - start
        self.window_len[...] = window_len
        super().advance(new_tokens, counted_on_device and on_device)   # committing moved the windows

    def due_in(self, window_len: np.ndarray) -> np.ndarray:
        """Per sequence, the full blocks past the window in windows of these lengths."""
        return np.maximum(window_len - self.window, 0) // self.block

    def commits_after(self, new_tokens: int) -> bool:
        """Whether advance(new_tokens) commits the compression in flight: DEFER_STEPS decode steps after
        it started, or at once when a longer step comes or more blocks fall due."""
        pending = self.in_flight
        return pending is not None and (new_tokens > 1 or self._commits_within(self.window_len, pending, 1))

    def reorganises_within(self, steps: int) -> bool:
        pending = self.in_flight
        if pending is None or pending.ahead is None:
            return self._commits_within(self.window_len, pending, steps)
        # its commit's device work is done: whether the next one follows within the steps
        at = self.commit_in()
        after = self.window_len + at - pending.due * self.block
        return steps > at and self._commits_within(after, None, steps - at)

    def _commits_within(self, window_len: np.ndarray, pending, steps: int) -> bool:
        """Whether a compression commits within `steps` one-token advances from windows of window_len with
        `pending` (a Compression, or None) in flight."""
        due = self.due_in(window_len + steps)
        if pending is not None:        # it commits DEFER_STEPS after its start, or when more blocks fall due
            return pending.steps + steps >= self.defer_steps or bool((due > pending.due).any())
        if not due.any():
            return False
        # a compression starts at the first step that completes some sequence's block (0: blocks are due
        # already, as after a commit done ahead whose advance starts the next one), and commits defer_steps
        # steps later, or as soon as more blocks fall due (another sequence's included)
        first = max(0, int((self.window + self.block - window_len).min()))
        return (not self.defer_steps or self.refused or steps >= first + self.defer_steps
                or bool((due > self.due_in(window_len + first)).any()))

    def commit_in(self) -> int:
        """The one-token advance (1: the next) that commits the compression in flight."""
        steps = 1
        while not self._commits_within(self.window_len, self.in_flight, steps):
            steps += 1
        return steps

    def commit_ahead(self, in_flight: int, stream=None) -> bool:
        pending = self.in_flight
        if pending is None or pending.ahead is not None or self.commit_in() != in_flight:
            return False
        if stream is not None:   # behind the current stream's work too (a kind that encodes there)
            stream.wait_event(self.backend.xp.cuda.get_current_stream().record())
        with stream if stream is not None else contextlib.nullcontext():
            offsets = pending.records.offsets_ahead()
            if offsets is None:
                return False
            pending.ahead = True                                # from here on the device commits it
            window_len = self.window_len + in_flight            # as that step's advance leaves them
            self.publish(pending, offsets, window_len)
            set_device_array(self.window_starts, window_len - pending.due * self.block)
            set_device_array(self.device_n_blocks, self.n_blocks + pending.due)
            if stream is not None:
                pending.ahead = stream.record()
        return True

    def catch_up(self) -> None:
        if self.in_flight is not None and self.in_flight.ahead is not None:
            self.settle()

    def settle(self) -> None:
        """Commit the compression in flight now (waiting for its encoder)."""
        if self.in_flight is not None:
            self.window_len[...] = self.commit(self.in_flight, self.window_len)
            self.upload_counters()

    def row(self, b: int) -> "KVCache":
        """super().row, which compresses at once: the batch's own compression in flight is committed first,
        and the row never defers one (it could not share it with the batch: both would write the arena
        from the same end)."""
        self.settle()
        view = super().row(b)
        view.defer_steps = 0
        return view

    def upload_counters(self) -> None:
        super().upload_counters()
        set_device_array(self.window_starts, self.window_len)
        set_device_array(self.device_n_blocks, self.n_blocks)

    def device_counters(self) -> list:
        return [self.starts, self.window_starts]

    def start_compress(self, due: np.ndarray) -> "Compression":
        """Start encoding the oldest due[b] blocks of every sequence's window, all layers in one encoder
        call (start_records). Nothing the cache's readers see changes until `commit`."""
        s, block, xp = self.shape, self.block, self.backend.xp
        owners = [(layer, b, self.n_blocks[b] + j) for b in np.flatnonzero(due) for layer in range(s.layers)
                  for j in range(due[b])]                   # owners[i] = (layer, sequence, block index) of block i
        k_blocks, v_blocks = [], []
        for b in np.flatnonzero(due):
            # [layers, kv_heads, due * block, D] -> [layers * due, kv_heads, block, D], layer-major
            for x, out in ((self.window_k, k_blocks), (self.window_v, v_blocks)):
                y = x[:, b, :, :due[b] * block].reshape(s.layers, s.kv_heads, due[b], block, s.head_dim)
                out.append(y.transpose(0, 2, 1, 3, 4).reshape(-1, s.kv_heads, block, s.head_dim))
        n = len(owners)
        if n > self.staging_k.shape[0]:        # a prefill's many blocks: gathered where they are
            k_all, v_all = xp.concatenate(k_blocks), xp.concatenate(v_blocks)
        else:                                  # a decode step's (a block per sequence): no allocation
            k_all, v_all = self.staging_k[:n], self.staging_v[:n]
            for parts, staging in ((k_blocks, k_all), (v_blocks, v_all)):
                xp.concatenate(parts, out=staging)
        return Compression(due, owners, self.start_records(k_all, v_all, owners))

    def commit(self, compression: "Compression", window_len: np.ndarray) -> np.ndarray:
        """Make a started compression's records the blocks' storage: the table of offsets, the block
        counts, the windows slid past them. Returns the windows' new lengths. Nothing changes if the
        records cannot be written (NaN, inf): the compression is dropped and the error raised."""
        self.in_flight = None
        try:
            offsets = compression.records.offsets()
        except Exception:
            self.refused = True   # the blocks stay due; deferring them again would only grow the windows
            raise
        self.refused = False
        if compression.ahead is None:
            self.publish(compression, offsets, window_len)
        elif compression.ahead is not True:   # what comes next on this stream follows the device's commit
            self.backend.xp.cuda.get_current_stream().wait_event(compression.ahead)
        self.n_blocks += compression.due
        self.compression_totals["events"] += 1
        return window_len - compression.due * self.block

    def publish(self, compression: "Compression", offsets: np.ndarray, window_len: np.ndarray) -> None:
        """The device side of a commit: the records' offsets into the table, the windows (of window_len
        tokens) slid past the blocks."""
        due, owners, block = compression.due, compression.owners, self.block
        layer_index, row_index, block_index = (np.array(column) for column in zip(*owners))
        self.block_offsets[layer_index, row_index, block_index] = self.backend.xp.asarray(offsets[:-1])
        if self.keep_decoded:
            self.store_decoded(offsets, owners)
        for b in np.flatnonzero(due):
            tokens = due[b] * block
            keep = window_len[b] - tokens
            for x in (self.window_k, self.window_v):
                x[:, b, :, :keep] = x[:, b, :, tokens:tokens + keep].copy()

    def encoding_groups(self, owners) -> list:
        """[(indices into owners, encoder parameters, per-token bounds)]: blocks encoded together. Here one
        group, the kind's parameters (None), no per-token bounds (None); a kind may encode some blocks with
        other parameters."""
        return [(list(range(len(owners))), None, None)]

    def encode_grouped(self, k_blocks, v_blocks, owners):
        """encode's output for blocks [n, kv_heads, block, D] (block i of owners[i]): one `encode` call per
        group of encoding_groups, the records then back to back in block order."""
        groups = self.encoding_groups(owners)
        if len(groups) == 1:
            return self.encode(k_blocks, v_blocks, *groups[0][1:])
        records = [None] * len(owners)
        for group, params, token_rel in groups:
            index = self.backend.xp.asarray(np.array(group))
            buffer, offsets = self.encode(k_blocks[index], v_blocks[index], params, token_rel)
            for i, start, end in zip(group, offsets[:-1], offsets[1:]):
                records[i] = buffer[start:end]
        return self.backend.xp.concatenate(records), np.cumsum([0] + [r.size for r in records])

    def refuse_nonfinite(self, k_blocks, v_blocks, owners) -> None:
        """NaN or inf cannot be quantized: name the layer, sequence and token position instead."""
        xp = self.backend.xp
        for name, x in (("K", k_blocks), ("V", v_blocks)):
            bad = ~xp.isfinite(x).all(axis=-1)                       # [blocks, kv_heads, block]
            if bool(bad.any()):
                raise self.nonfinite_error(name, *(int(a) for a in xp.argwhere(bad)[0]), owners)

    def nonfinite_error(self, name: str, i: int, head: int, t: int, owners) -> PackkvError:
        """The error for a non-finite value at token t of KV head `head` of block i (owners[i])."""
        layer, b, j = owners[i]
        return PackkvError(f"cannot compress the KV cache: {name} of layer {layer}, sequence {b}, KV head "
                           f"{head}, token position {j * self.block + t} is not finite (NaN or inf)")

    def start_records(self, k_blocks, v_blocks, owners):
        """Begin encoding the records of blocks [n, kv_heads, block, D] (block i of owners[i]). The result's
        `.offsets()` (at the commit) takes them into the arena from its used end on, back to back in block
        order, and returns their arena offsets [n + 1] (host int64), waiting for them if need be. Here:
        `encode_grouped` now, the copy into the arena at the commit."""
        self.refuse_nonfinite(k_blocks, v_blocks, owners)
        return BufferedRecords(self.arena, *self.encode_grouped(k_blocks, v_blocks, owners))

    def store_decoded(self, offsets, owners) -> None:
        records = self.backend.to_numpy(self.arena.data[offsets[0]:offsets[-1]])
        k_hat, v_hat = (self.backend.xp.asarray(x) for x in self.decode(records, offsets - offsets[0]))
        block = self.block
        for i, (layer, b, j) in enumerate(owners):
            self.decoded_k[layer, b, :, j * block:(j + 1) * block] = k_hat[i]
            self.decoded_v[layer, b, :, j * block:(j + 1) * block] = v_hat[i]

    # ---- sizes ----------------------------------------------------------------------------------

    def bytes_used(self) -> int:
        """Every stored byte: the records, their offset-table entries, the window's live tokens."""
        window_bytes = int(self.window_len.sum()) * self.token_fp16_bytes()
        table_bytes = int(self.n_blocks.sum()) * self.shape.layers * 8
        return self.arena.used + table_bytes + window_bytes

    def bytes_reserved(self) -> int:
        return (self.arena.capacity + self.block_offsets.nbytes + self.window_k.nbytes + self.window_v.nbytes
                + self.staging_k.nbytes + self.staging_v.nbytes)

    def stats(self) -> dict:
        stats = super().stats()
        elements = int(self.lengths.sum()) * self.token_fp16_bytes() // 2
        stats.update(bits_per_element=8 * self.bytes_used() / elements if elements else None,
                     compress_seconds=self.compression_totals["seconds"],
                     compress_events=self.compression_totals["events"],
                     kv_params={**self.kind_params(), "window": self.window})
        return stats


def checked_sink_tokens(value, name: str = "sink_tokens") -> int:
    """How many of a sequence's first tokens are at the sink bounds: a whole number >= 1, else PackkvError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PackkvError(f"{name} must be a whole number >= 1 (the first tokens at the sink bounds), not {value!r}")
    return int(value)


class PackkvCache(BlockCache):
    """PackKV's compressed cache: blocks in packkv/codec.py's format (token-wise relative-error
    quantization, repacking, bit-packing). On the GPU, decode attention reads the compressed bytes and
    decompresses in registers (kernels/packkv_attention.cu); prefill chunks decompress the blocks they
    need; nothing decoded is kept. On the CPU, the NumPy reference path."""

    kind = "packkv"

    def __init__(self, shape: CacheShape, backend: Backend, params: codec.CodecParams = codec.CodecParams(),
                 window: int = 128, max_new_tokens: int = 512, scales: "ChannelScales | None" = None,
                 sink: tuple[float, float] | None = None, layer_scales: "LayerScales | None" = None,
                 sink_tokens: int | None = None):
        self.params = params
        # (rel_k, rel_v) of every sequence's first tokens, which draw much of the attention (attention
        # sinks): tighter there costs their bytes and cuts the error attention reads most. sink_tokens: how
        # many (None: the whole first block); the encoder picks each token's bound, the decoder does not
        # need them, so the format is the same.
        self.sink_params = None if sink is None else replace(params, rel_k=sink[0], rel_v=sink[1])
        self.sink_tokens = None if sink_tokens is None else checked_sink_tokens(sink_tokens)
        # Per-layer bounds: the cache's (rel_k, rel_v) times each layer's multipliers (the other blocks).
        self.layer_scales = layer_scales
        self.layer_params = None if layer_scales is None else layer_scales.params(params, shape.layers)
        # Every bound this cache encodes with (block_bounds, token_bounds: the cache's, each layer's, the
        # sink bounds) keeps every pack <= 4 bits wide: decode attention may launch the NARROW build of the
        # fused kernel (no wide unpack path; kernels/packkv_attention.cu's header). Fixed at construction:
        # the bounds never change afterwards, and only this cache's encoders write its arena.
        bounds = [params] + (self.layer_params or []) + ([self.sink_params] if self.sink_params else [])
        self.narrow = all(codec.max_pack_width([p.rel_k, p.rel_v]) <= 4 for p in bounds)
        super().__init__(shape, backend, params.block, window, max_new_tokens, keep_decoded=not backend.is_gpu)
        self.scales = None if scales is None else scales.on(backend, shape)
        self.attention_workspace = None      # ((query heads, batch), the decode kernel's workspace), on first use

    @property
    def graph_capturable(self) -> bool:
        return self.backend.is_gpu

    def append(self, layer: int, k, v) -> None:
        if self.scales is not None:     # the cache holds K and V divided by the channel scales
            k, v = self.scales.to_cached(layer, k, v)
        super().append(layer, k, v)

    def kv_stored_as_given(self) -> bool:
        return self.backend.is_gpu and self.scales is None and type(self).append is PackkvCache.append

    def attend(self, layer: int, q):
        if self.scales is None:
            return self.attend_cached(layer, q)
        # (q*s).(k/s) is q.k, and s * p.(v/s) is p.v: exact, whatever the cache's error
        return self.scales.output(layer, self.attend_cached(layer, self.scales.query(layer, q)))

    def attend_cached(self, layer: int, q):
        """Attention over what the cache holds (K and V divided by the channel scales, if any)."""
        if not (self.backend.is_gpu and self.pending == 1):
            return super().attend(layer, q)
        from packkv.kernels.attention_kernels import attention_workspace, compressed_decode_attention
        key = (q.shape[1], self.shape.batch)   # a row's view has its own (batch 1: other splits)
        if self.attention_workspace is None or self.attention_workspace[0] != key:
            # made once and kept: not an allocation in every layer of every step. It is the cache's own, so it
            # comes from the default pool even inside a graph decoder's capture: a decoder drops its private
            # pool when it captures again (or goes), and CuPy 13's pool frees its memory with it
            s, cupy = self.shape, self.backend.xp
            with cupy.cuda.using_allocator(cupy.get_default_memory_pool().malloc):
                self.attention_workspace = (key, attention_workspace(s.batch, q.shape[1], s.kv_heads, s.head_dim,
                                                                     self.max_blocks, self.params))
        out = compressed_decode_attention(q[:, :, 0], self.arena.data, self.block_offsets[layer],
                                          self.device_n_blocks, self.window_k[layer], self.window_v[layer],
                                          self.window_ends, self.params, workspace=self.attention_workspace[1],
                                          arena_address=self.arena.address, narrow=self.narrow)
        return out[:, :, None]

    def decompress(self, offsets):
        from packkv.kernels.attention_kernels import decompress_blocks
        k, v = decompress_blocks(self.arena.data, offsets, self.params, self.shape.kv_heads, self.shape.head_dim)
        # [n, Hkv, block, D] -> [Hkv, n * block, D]
        return tuple(x.transpose(1, 0, 2, 3).reshape(self.shape.kv_heads, -1, self.shape.head_dim) for x in (k, v))

    def sink_counts(self, owners) -> np.ndarray:
        """[n] int64: how many of block owners[i]'s tokens (its first ones) are sink tokens, among a
        sequence's first sink_tokens (None: the whole first block)."""
        block_index = np.array(owners, dtype=np.int64).reshape(-1, 3)[:, 2]
        if self.sink_params is None:
            return np.zeros_like(block_index)
        sink_tokens = self.block if self.sink_tokens is None else self.sink_tokens
        return np.clip(sink_tokens - block_index * self.block, 0, self.block)

    def block_bounds(self, owners) -> tuple[np.ndarray, np.ndarray]:
        """rel_k, rel_v [n] (float64) of the blocks owners[i] = (layer, sequence, block index): a block of sink
        tokens only (a sequence's first, by default) at the sink bounds, the others at their layer's (layer
        scales), else the cache's. A block that is only partly sink tokens has its layer's here and
        `partial_sinks` says how many of its first tokens are at the sink bounds."""
        layer, _, block_index = np.array(owners, dtype=np.int64).reshape(-1, 3).T
        per_layer = self.layer_params or [self.params] * self.shape.layers
        rel_k = np.array([p.rel_k for p in per_layer])[layer]
        rel_v = np.array([p.rel_v for p in per_layer])[layer]
        if self.sink_params is not None:
            whole = self.sink_counts(owners) == self.block
            rel_k[whole], rel_v[whole] = self.sink_params.rel_k, self.sink_params.rel_v
        return rel_k, rel_v

    def partial_sinks(self, owners) -> np.ndarray:
        """[n] int64: the number of leading tokens of block owners[i] encoded at the sink bounds while the
        rest are at block_bounds' (0 for a block all at one pair: most blocks, and every block when the
        sink tokens are the whole first block)."""
        n = self.sink_counts(owners)
        return np.where(n == self.block, 0, n)

    def token_bounds(self, rel_k: float, rel_v: float, n_sink: int):
        """(rel_k, rel_v) [block] of a block whose first n_sink tokens are at the sink bounds, the rest at
        (rel_k, rel_v); None if n_sink is 0."""
        if n_sink == 0:
            return None
        sink = np.arange(self.block) < n_sink
        return (np.where(sink, self.sink_params.rel_k, rel_k), np.where(sink, self.sink_params.rel_v, rel_v))

    def encoding_groups(self, owners) -> list:
        """One group, and one codec call, per distinct (block_bounds, partial_sinks) (the CPU path; the GPU
        encoder takes every block's bounds in one launch)."""
        keys = np.stack([*self.block_bounds(owners), self.partial_sinks(owners)], axis=1)
        triples, group_of = np.unique(keys, axis=0, return_inverse=True)
        group_of = group_of.reshape(-1)
        return [(np.flatnonzero(group_of == g).tolist(), replace(self.params, rel_k=float(rk), rel_v=float(rv)),
                 self.token_bounds(float(rk), float(rv), int(n)))
                for g, (rk, rv, n) in enumerate(triples)]

    def start_records(self, k_blocks, v_blocks, owners):
        """On the GPU the Numba encoder (kernels/encoder.py, bit-identical to codec.py) writes the records
        straight into the arena in one launch, each block with its own bounds (block_bounds), and finds
        NaN and inf itself; its result is read when the compression commits (EncoderRecords)."""
        if not self.backend.is_gpu:
            return super().start_records(k_blocks, v_blocks, owners)
        return EncoderRecords(self, k_blocks, v_blocks, owners)

    def encode(self, k_blocks, v_blocks, params=None, token_rel=None):
        buffer, offsets, _ = codec.encode_blocks(k_blocks, v_blocks, params or self.params, token_rel)
        return buffer, offsets

    def decode(self, buffer, offsets):
        return codec.decode_blocks(buffer, offsets, self.params, self.shape.kv_heads, self.shape.head_dim)

    def kind_params(self) -> dict:
        sink = None if self.sink_params is None else [self.sink_params.rel_k, self.sink_params.rel_v]
        layers = None if self.layer_scales is None else self.layer_scales.as_json()
        return {**vars(self.params), "channel_scales": self.scales is not None, "sink": sink,
                **({"sink_tokens": self.sink_tokens} if self.sink_tokens is not None else {}), "layer_scales": layers}

    def bytes_used(self) -> int:
        """The blocks, the window, and the channel scales (once per cache)."""
        return super().bytes_used() + (0 if self.scales is None else self.scales.nbytes)


class EncoderRecords:
    """A packkv cache's records being written by the GPU encoder from the arena's used end on. offsets()
    waits for them, then takes their bytes into the arena; when they did not fit, the arena grows and
    the launch repeats; NaN or inf in a block raises the cache's error naming its layer and position."""

    def __init__(self, cache: PackkvCache, k_blocks, v_blocks, owners):
        self.cache, self.k_blocks, self.v_blocks, self.owners = cache, k_blocks, v_blocks, owners
        self.rel_k, self.rel_v = cache.block_bounds(owners)
        # blocks only partly of sink tokens: their first ones at the sink bounds (the kernel's per-token choice)
        self.sink_tokens = cache.partial_sinks(owners)
        self.sink_rel = None if cache.sink_params is None else (cache.sink_params.rel_k, cache.sink_params.rel_v)
        if not self.sink_tokens.any():
            self.sink_tokens = self.sink_rel = None
        self.job = self.launch()

    def launch(self):
        from packkv.kernels.encoder import start_blocks_device
        arena = self.cache.arena
        return start_blocks_device(self.k_blocks, self.v_blocks, self.cache.params, arena.writable, arena.used,
                                   rel_k=self.rel_k, rel_v=self.rel_v, sink_tokens=self.sink_tokens,
                                   sink_rel=self.sink_rel)

    def offsets(self) -> np.ndarray:
        from packkv.kernels.encoder import ArenaFullError, NonFiniteInputError
        while True:
            try:
                used, offsets = self.job.result()
                break
            except ArenaFullError as full:
                self.cache.arena.ensure(full.needed)
                self.job = self.launch()
            except NonFiniteInputError as bad:
                raise self.cache.nonfinite_error(bad.array.upper(), bad.block, bad.head, bad.token,
                                                 self.owners) from None
        self.cache.arena.used = used
        return offsets

    def offsets_ahead(self) -> np.ndarray | None:
        """offsets(), unless the records did not fit (the arena must grow and the encoder run again) or
        hold NaN or inf: then None, and the commit in its own step does either."""
        from packkv.kernels.encoder import ArenaFullError, NonFiniteInputError
        try:
            self.job.result()
        except (ArenaFullError, NonFiniteInputError):
            return None
        return self.offsets()


class LayerScales:
    """Per-layer multipliers of packkv's bounds, k and v [layers]: layer l's blocks (but a sequence's first
    block, when sink bounds are set) are encoded at rel_k * k[l], rel_v * v[l], clipped to [2**-12, 1].
    `python -m packkv.eval layers` measures each layer's sensitivity on a calibration text and gives
    sensitive layers tighter bounds and robust ones looser (geometric mean 1: about the same bytes), saved
    in the tuned profile. Only the encoder's bounds change, per block (PackkvCache.block_bounds); records
    carry their steps, so the format, the decoder and the attention kernels are the same."""

    def __init__(self, k, v):
        self.k, self.v = (np.asarray(x, dtype=np.float64) for x in (k, v))
        if self.k.shape != self.v.shape or self.k.ndim != 1:
            raise PackkvError(f"layer scales must be two [layers] lists, got shapes {self.k.shape} and {self.v.shape}")
        if not all(np.isfinite(s).all() and (s > 0).all() for s in (self.k, self.v)):
            raise PackkvError("layer scales must be finite and positive")

    def params(self, base: codec.CodecParams, layers: int) -> list:
        """Each layer's CodecParams: base's bounds times the layer's multipliers."""
        if len(self.k) != layers:
            raise PackkvError(f"the layer scales are for {len(self.k)} layers, the model has {layers} (a profile "
                              f"of another model? --kv-layer-scales none or --kv-profile none ignores them)")

        def bound(rel, m):
            return float(min(max(rel * m, codec.MIN_REL), 1.0))
        return [replace(base, rel_k=bound(base.rel_k, mk), rel_v=bound(base.rel_v, mv))
                for mk, mv in zip(self.k, self.v)]

    def as_json(self) -> dict:
        return {"k": self.k.tolist(), "v": self.v.tolist()}


class ChannelScales:
    """Per-layer, per-KV-head, per-channel scales s_k and s_v [layers, kv_heads, head_dim], calibrated
    per model and saved in its tuned profile. The cache stores k/s_k and v/s_v; attention takes q*s_k and
    multiplies its output by s_v. Both are exact rewrites of attention ((q*s).(k/s) = q.k, and
    s * p.(v/s) = p.v channel by channel), so only where the quantization error lands changes: a
    token-wise bound spends the same levels on every channel of a token, and dividing by s gives the
    channels of small s finer steps in the original units. The codec, its format and every kernel are
    untouched: they see other numbers. On the GPU the three rescalings are CuPy elementwise ops.
    """

    def __init__(self, k, v):
        self.k, self.v = np.asarray(k, dtype=np.float32), np.asarray(v, dtype=np.float32)
        if self.k.shape != self.v.shape or self.k.ndim != 3:
            raise PackkvError(f"channel scales must be two [layers, kv_heads, head_dim] arrays, got "
                              f"{self.k.shape} and {self.v.shape}")
        if not all(np.isfinite(s).all() and (s > 0).all() for s in (self.k, self.v)):
            raise PackkvError("channel scales must be finite and positive")

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def on(self, backend: Backend, shape: CacheShape) -> "ChannelScales":
        """A copy with device arrays shaped to broadcast over one layer's [B, H, T, D], checked against
        the cache's shape."""
        expected = (shape.layers, shape.kv_heads, shape.head_dim)
        if self.k.shape != expected:
            raise PackkvError(f"the channel scales are for [layers, kv_heads, head_dim] = {self.k.shape}, the "
                              f"cache is {expected} (a profile of another model? --kv-scales none or --kv-profile none ignores "
                              f"its scales)")
        placed, xp = copy.copy(self), backend.xp

        def per_layer(s):  # [layers, 1, kv_heads, 1, D]
            return xp.asarray(s[:, None, :, None, :])

        placed.k_inverse, placed.v_inverse = per_layer(1.0 / self.k), per_layer(1.0 / self.v)
        placed.k_device, placed.v_device = per_layer(self.k), per_layer(self.v)
        return placed

    def to_cached(self, layer: int, k, v):
        """k, v [B, kv_heads, T, D] -> what the cache stores, k / s_k and v / s_v, in their dtype."""
        return (k * self.k_inverse[layer]).astype(k.dtype), (v * self.v_inverse[layer]).astype(v.dtype)

    def query(self, layer: int, q):
        """q [B, heads, T, D] -> q * s_k."""
        return grouped_multiply(q, self.k_device[layer])

    def output(self, layer: int, out):
        """Attention's output over the stored V, [B, heads, T, D] -> times s_v: the real output."""
        return grouped_multiply(out, self.v_device[layer])


def grouped_multiply(x, scale):
    """x [B, heads, T, D] times scale [1, kv_heads, 1, D] (query head h uses KV head h // (heads /
    kv_heads), as GQA does), in x's dtype."""
    B, heads, T, D = x.shape
    kv_heads = scale.shape[1]
    grouped = x.reshape(B, kv_heads, heads // kv_heads, T, D) * scale[:, :, None]
    return grouped.reshape(B, heads, T, D).astype(x.dtype)


def set_device_array(device_array, host_values) -> None:
    """Copy small host bookkeeping (lengths) into its device mirror, in place (its address is baked
    into captured graphs)."""
    values = np.asarray(host_values, dtype=device_array.dtype)
    if isinstance(device_array, np.ndarray):
        device_array[...] = values
    else:
        device_array.set(values)


def append_at(backend: Backend, k, v, cache_k, cache_v, host_starts, device_starts) -> None:
    """Write k, v [B, Hkv, T, D] into cache_k, cache_v [B, Hkv, capacity, D] at each sequence's start:
    one kernel reading the starts from device memory on the GPU, slice assignment on the CPU."""
    if backend.is_gpu:
        from packkv.kernels import model_ops
        xp = backend.xp
        model_ops.append_kv(xp.ascontiguousarray(k, np.float16), xp.ascontiguousarray(v, np.float16),
                            cache_k, cache_v, device_starts)
        return
    T = k.shape[2]
    for b, start in enumerate(host_starts):
        cache_k[b, :, start:start + T] = k[b]
        cache_v[b, :, start:start + T] = v[b]


def _gpu_oom_type():
    try:
        import cupy
        return cupy.cuda.memory.OutOfMemoryError
    except ImportError:
        return MemoryError


def _quant_cache(shape: CacheShape, backend: Backend, **params) -> KVCache:
    from packkv.quant import QuantCache   # the KIVI-style baseline; imported here: quant.py imports this module
    return QuantCache(shape, backend, **params)


CACHE_KINDS = {"dense": DenseCache, "packkv": PackkvCache, "quant": _quant_cache}


def make_cache(kind: str, shape: CacheShape, backend: Backend, **params) -> KVCache:
    if kind not in CACHE_KINDS:
        raise PackkvError(f"unknown cache kind {kind!r} (available: {', '.join(CACHE_KINDS)})")
    return CACHE_KINDS[kind](shape, backend, **params)
