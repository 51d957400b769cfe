"""What every benchmark shares: the device's name, reading prompt text, writing JSON and plots."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_TEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brown.txt"
REAL_KV = Path(__file__).resolve().parents[1] / ".stage" / "kv" / "smollm2_brown1024.npz"   # bench/dump_kv.py


def git_revision() -> str:
    """HEAD's short hash; $PACKKV_GIT where the tree travelled without .git (the GPU machine)."""
    if os.environ.get("PACKKV_GIT"):
        return os.environ["PACKKV_GIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def header(device: str) -> dict:
    """Top-level fields of every results file: where, when and with what it was measured."""
    return {"device": device, "command": " ".join([Path(sys.executable).name] + sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git": git_revision(),
            "host_python": platform.python_version()}


def write_json(name: str, payload: dict, quiet: bool = False) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}", file=sys.stderr)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(x) -> str:
    return f"{x:.1f}" if isinstance(x, float) else str(x)


def copy_gbps(cupy) -> float:
    """Device-to-device copy bandwidth of a 1 GiB buffer, bytes read + bytes written per second (GB/s)."""
    n = 1 << 30
    src, dst = cupy.ones(n, np.uint8), cupy.empty(n, np.uint8)
    dst[...] = src
    cupy.cuda.Device().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(10):
        dst[...] = src
    end.record(); end.synchronize()
    t = cupy.cuda.get_elapsed_time(start, end) / 1e3 / 10
    del src, dst
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * n / t / 1e9


def graph_time_us(cupy, calls, min_ms: float = 60.0) -> tuple[float, bool]:
    """Per-call time of `calls` (a list of no-argument launches), replayed as one captured CUDA graph."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for c in calls:          # warm-up (compiles, allocator)
            c()
        stream.synchronize()
        try:
            stream.begin_capture()
            for c in calls:
                c()
            graph = stream.end_capture()
            run, used_graph = (lambda: graph.launch(stream)), True
        except Exception as exc:   # capture not possible: time the launches themselves
            print(f"  (no graph: {exc})", file=sys.stderr)
            try:
                stream.end_capture()
            except Exception:
                pass
            run, used_graph = (lambda: [c() for c in calls]), False
        run()
        stream.synchronize()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        run()
        end.record(stream)
        end.synchronize()
        once = cupy.cuda.get_elapsed_time(start, end)
        reps = max(3, min(200, int(min_ms / max(once, 1e-3))))
        start.record(stream)
        for _ in range(reps):
            run()
        end.record(stream)
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) * 1e3 / (reps * len(calls)), used_graph


def graph_replay_us(decoder, replays: int, rounds: int = 1, warmup: int = 1) -> float:
    """A GraphDecoder's captured step replayed back to back: microseconds per replay, the best of `rounds`
    rounds, after `warmup` steps through decoder.launch (which captures again if the cache's buffers
    moved). Replays read the cache and never commit, so every one is the same step."""
    for _ in range(warmup):
        decoder.launch()
    decoder.stream.synchronize()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(replays):
            decoder.graph.launch(decoder.stream)
        decoder.stream.synchronize()
        best = min(best, (time.perf_counter() - start) / replays * 1e6)
    return best


def real_heads(path: Path = REAL_KV):
    """SmolLM2's K and V heads from bench/dump_kv.py's dump: float32 [layers * 3, tokens, 64] each."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: make it with `python bench/dump_kv.py` (CPU, about a minute)")
    data = np.load(path)
    k, v = data["k"].astype(np.float32), data["v"].astype(np.float32)     # [layers, 3, tokens, 64]
    return k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
