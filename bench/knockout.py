"""What each kernel kind costs inside a captured decode step: the step's graph against the same graph
captured with that kind's kernels left out.

    python bench/knockout.py --model llama-3.1-8b --context 130944 --batch 1 --kv-data real
    python bench/knockout.py --model llama-3.1-8b --context 32768 --batch 8 --kv-data real --tiles both
    python bench/knockout.py --model smollm2-135m --context 7800

Random weights of the model's shape (packkv.weights.random), each cache kind filled with --context tokens
of K/V per sequence (bench/generate.py's fill_random or fill_real). A kernel kind is part of the kernels'
names (kernels/launch.py's knocked_out); a step captured without it computes garbage and only its time
means anything. saves_us = the whole graph's time - the time without the kind: with programmatic
dependent launches kernels overlap their neighbours' tails, so the savings do not add up to the whole.
The graphs are replayed back to back (best of 3 rounds of --replays). --tiles both also times packkv's
split kernel in tile mode (attention_kernels.tile_mode picks it for short contexts only:
TILE_ITEMS_PER_WARP); `tile_mode` in each record says which mode the split kernel ran in. --narrow both also
times packkv's split kernel in its wide build (PackkvCache.narrow forced off; at the default bounds the cache
launches the NARROW build, packkv_attention.cu's header); `narrow` in each record says which build ran.
--slots both times packkv's split kernel with one staging slot per warp in item mode (3 CTAs per SM) and
with two (the double-buffered pipeline at 2 CTAs per SM); by default attention_kernels.item_slots chooses
from the shapes; `slots` in each record says which ran (tile mode, short contexts, has its own slots).
bench/results/knockout_<model>.json.
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import graph_replay_us, header, print_table, write_json  # noqa: E402

# The kinds knocked out one at a time, per cache kind, then all of a cache's attention kernels together.
ATTENTION_KINDS = {"dense": ("dense_attention_split", "dense_attention_merge"),
                   "packkv": ("pk_attention", "pk_merge_window"),
                   "quant": ("qt_attention", "pk_merge_window")}
WEIGHT_KINDS = ("linear_rows",)                      # the GEMVs (and linear_rows_mma at batch > 1)


def knockouts(engine, cache, kinds: tuple[str, ...], replays: int) -> list[tuple[str, float]]:
    """(kind knocked out or '-', graph us) for the whole step, each kind alone, all attention kinds together
    and the GEMVs."""
    from packkv.generate import GraphDecoder
    from packkv.kernels.launch import knocked_out
    rows = []
    for names in ((), *((k,) for k in kinds), kinds, WEIGHT_KINDS):
        decoder = GraphDecoder(engine, cache)
        with knocked_out(*names) as skipped:
            decoder.capture()
        if not all(skipped.values()):
            raise SystemExit(f"no kernel of the step is named like {[n for n, k in skipped.items() if not k]}: "
                             f"the kinds of bench/knockout.py must follow the kernels' names")
        rows.append(("+".join(names) or "-", graph_replay_us(decoder, replays, rounds=3, warmup=5)))
        print(f"  {rows[-1][0]:45s} {rows[-1][1]:9.1f} us", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    from packkv.weights.random import PRESETS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=list(PRESETS))
    ap.add_argument("--context", type=int, default=130944, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--caches", nargs="+", default=["packkv", "dense"], choices=list(ATTENTION_KINDS))
    ap.add_argument("--kv-data", choices=["random", "real"], default="random",
                    help="the K/V filled in: Gaussian, or SmolLM2's real K/V tiled (bench/generate.py's fill_real)")
    ap.add_argument("--tiles", choices=["default", "both"], default="default",
                    help="both: the compressed caches also with their split kernel in tile mode")
    ap.add_argument("--narrow", choices=["default", "both"], default="default",
                    help="both: packkv also with the wide build of its split kernel (the cache's narrow forced off)")
    ap.add_argument("--slots", choices=["default", "both"], default="default",
                    help="both: packkv with one and with two staging slots per warp in its split kernel's item mode")
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--out", help="default: knockout_<model>.json")
    args = ap.parse_args()

    import cupy
    from generate import fill_random, fill_real
    from packkv.generate import Engine
    from packkv.kernels import attention_kernels
    limit = PRESETS[args.model]["max_position_embeddings"]          # the engine refuses a longer context
    engine = Engine(None, device="gpu", max_context=min(args.context + 128, limit), random_weights=args.model)
    default_crossover = attention_kernels.TILE_ITEMS_PER_WARP
    default_slots = attention_kernels.ITEM_SLOTS
    records = []
    for kind in args.caches:
        modes = ["default", "tiles"] if args.tiles == "both" and kind == "packkv" else ["default"]
        builds = ["default", "wide"] if args.narrow == "both" and kind == "packkv" else ["default"]
        slot_counts = [1, 2] if args.slots == "both" and kind == "packkv" else [default_slots]
        for mode, build, slots in [(m, b, n) for m in modes for b in builds for n in slot_counts]:
            # for the whole of the cache's life: its attention workspace (sized at the first step) and the
            # launches must agree on the mode's splits
            attention_kernels.TILE_ITEMS_PER_WARP = float("inf") if mode == "tiles" else default_crossover
            attention_kernels.ITEM_SLOTS = slots
            cache = engine.new_cache(kind, batch=args.batch, tokens=args.context + 64)
            if build == "wide":
                cache.narrow = False              # always safe: the wide build decodes any record
            narrow = bool(getattr(cache, "narrow", False))
            shapes = (args.batch, cache.shape.kv_heads, engine.config.num_attention_heads // cache.shape.kv_heads)
            if kind == "packkv":
                tiles = attention_kernels.decode_geometry(*shapes, cache.shape.head_dim, cache.max_blocks,
                                                          cache.params.block)[0]
                slots = None if tiles else attention_kernels.item_slots(slots, *shapes, cache.max_blocks,
                                                                         cache.params.block)
            else:
                tiles = False
            (fill_real if args.kv_data == "real" else fill_random)(engine, cache, args.context)
            print(f"{kind}, {mode} split mode, {'NARROW' if narrow else 'wide'} build, {slots} slot(s) per warp, "
                  f"{args.batch} x {args.context} tokens:", file=sys.stderr)
            rows = knockouts(engine, cache, ATTENTION_KINDS[kind], args.replays)
            whole = rows[0][1]
            records += [{"model": args.model, "cache": kind, "split_mode": mode, "tile_mode": bool(tiles),
                         "narrow": narrow, "slots": slots, "context": args.context,
                         "batch": args.batch, "kv_data": args.kv_data, "knocked_out": name, "graph_us": us,
                         "saves_us": whole - us} for name, us in rows]
            del cache
            gc.collect()
            cupy.get_default_memory_pool().free_all_blocks()
    attention_kernels.TILE_ITEMS_PER_WARP = default_crossover
    attention_kernels.ITEM_SLOTS = default_slots
    print_table(records, ["cache", "split_mode", "narrow", "slots", "knocked_out", "graph_us", "saves_us"])
    write_json(args.out or f"knockout_{args.model}.json",
               {**header(engine.backend.device_name), "replays": args.replays, "records": records})


if __name__ == "__main__":
    main()
