"""Command-line options shared by generate and eval: the cache kind and its compression parameters."""
from __future__ import annotations

import argparse

from packkv import codec
from packkv.cache import CACHE_KINDS
from packkv.errors import PackkvError


def add_cache_arguments(ap: argparse.ArgumentParser) -> None:
    d = codec.CodecParams()
    g = ap.add_argument_group("KV cache")
    g.add_argument("--cache", default="dense", choices=sorted(CACHE_KINDS), help="kind of KV cache")
    g.add_argument("--kv-rel-k", type=float, default=d.rel_k, help="relative error bound of K (packkv)")
    g.add_argument("--kv-rel-v", type=float, default=d.rel_v, help="relative error bound of V (packkv)")
    g.add_argument("--kv-granularity", default=d.granularity, choices=codec.GRANULARITIES)
    g.add_argument("--kv-repack", default=d.repack, choices=codec.REPACK_METHODS)
    g.add_argument("--kv-pack", type=int, default=d.pack, choices=codec.PACK_SIZES, help="tokens per pack")
    g.add_argument("--kv-block", type=int, default=d.block, help="tokens per compressed block")
    g.add_argument("--kv-window", type=int, default=128, help="recent tokens kept in fp16")


def cache_params(args) -> dict:
    """The keyword arguments of the chosen cache kind, validated."""
    if args.cache != "packkv":
        return {}
    try:
        params = codec.CodecParams(rel_k=args.kv_rel_k, rel_v=args.kv_rel_v, granularity=args.kv_granularity,
                                   repack=args.kv_repack, pack=args.kv_pack, block=args.kv_block)
    except ValueError as exc:
        raise PackkvError(f"invalid KV compression parameters: {exc}") from exc
    if args.kv_window < 0:
        raise PackkvError(f"--kv-window must be >= 0, not {args.kv_window}")
    return {"params": params, "window": args.kv_window}
