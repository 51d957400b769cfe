"""Command-line options shared by generate and eval: the cache kind, its parameters, and tuned profiles.

packkv's parameters come, in this order, from an explicit --kv-* flag, from the model's tuned profile
(written by `python -m packkv.eval tune`, found next to the weights or in the cache folder), or from the
codec's defaults. Every --kv-* flag therefore defaults to None; `--kv-profile none` ignores profiles.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

from packkv import codec
from packkv.cache import CACHE_KINDS, ChannelScales, LayerScales, checked_sink_tokens
from packkv.errors import PackkvError
from packkv.quant import QUANT_BITS, QUANT_GROUPS, QuantParams

DEFAULT_WINDOW = 128
PROFILE_NAME = "packkv_profile.json"
PROFILE_KEYS = ("rel_k", "rel_v", "granularity", "repack", "pack", "block")   # CodecParams' fields


def add_cache_arguments(ap: argparse.ArgumentParser) -> None:
    d = codec.CodecParams()
    g = ap.add_argument_group("KV cache (packkv's --kv-* defaults: the model's tuned profile, else the codec's)")
    g.add_argument("--cache", default="dense", choices=sorted(CACHE_KINDS), help="kind of KV cache")
    g.add_argument("--kv-rel-k", type=float, help=f"relative error bound of K (packkv; codec default {d.rel_k})")
    g.add_argument("--kv-rel-v", type=float, help=f"relative error bound of V (packkv; codec default {d.rel_v})")
    g.add_argument("--kv-granularity", choices=codec.GRANULARITIES, help=f"(codec default {d.granularity})")
    g.add_argument("--kv-repack", choices=codec.REPACK_METHODS, help=f"(codec default {d.repack})")
    g.add_argument("--kv-pack", type=int, choices=codec.PACK_SIZES, help=f"tokens per pack (default {d.pack})")
    g.add_argument("--kv-block", type=int, help=f"tokens per compressed block (default {d.block})")
    g.add_argument("--kv-window", type=int, help=f"recent tokens kept in fp16 (default {DEFAULT_WINDOW})")
    g.add_argument("--kv-sink", help="packkv: rel_k,rel_v of each sequence's first block (attention sinks), "
                                     "e.g. 0.02,0.05; 'none' for the cache's bounds (default: the profile's, else none)")
    g.add_argument("--kv-sink-tokens", type=int,
                   help="packkv: how many of each sequence's first tokens are at the --kv-sink bounds (default: the "
                        "profile's, else the whole first block); 'the whole first block' is what a profile without "
                        "it means")
    g.add_argument("--kv-scales", choices=["profile", "none"], default="profile",
                   help="packkv's channel scales: the tuned profile's, if it has them (default), or none")
    g.add_argument("--kv-layer-scales", choices=["profile", "none"], default="profile",
                   help="packkv's per-layer bound multipliers (`eval layers`): the tuned profile's, if it has "
                        "them (default), or none (every layer at --kv-rel-k/--kv-rel-v)")
    g.add_argument("--kv-profile", help="a tuned profile (JSON) for packkv's defaults, or 'none' (default: the "
                                        "profile `python -m packkv.eval tune` saved for the model, if any)")
    g.add_argument("--quant-bits", type=int, default=2, help=f"bits per element of the quant baseline {QUANT_BITS}")
    g.add_argument("--quant-group", type=int, default=32,
                   help=f"quant: tokens per K group and channels per V group {QUANT_GROUPS}")


def cache_params(args) -> dict:
    """The keyword arguments of the chosen cache kind, validated. Says on stderr when a profile is used."""
    window = DEFAULT_WINDOW if getattr(args, "kv_window", None) is None else args.kv_window
    if window < 0:
        raise PackkvError(f"--kv-window must be >= 0, not {window}")
    if args.cache == "quant":
        try:
            return {"params": QuantParams(bits=args.quant_bits, group=args.quant_group), "window": window}
        except ValueError as exc:
            raise PackkvError(f"invalid quant parameters: {exc} (--quant-bits, --quant-group)") from exc
    if args.cache != "packkv":
        return {}
    explicit = {key: getattr(args, f"kv_{key}", None) for key in PROFILE_KEYS}
    profile = find_profile(getattr(args, "weights", None), getattr(args, "kv_profile", None))
    taken = {k: v for k, v in (profile[1]["params"] if profile else {}).items()
             if k in PROFILE_KEYS and explicit[k] is None}
    try:
        params = codec.CodecParams(**{**taken, **{k: v for k, v in explicit.items() if v is not None}})
    except (TypeError, ValueError) as exc:
        raise PackkvError(f"invalid KV compression parameters: {exc}") from exc
    scales = profile_scales(profile[1]) if profile and getattr(args, "kv_scales", "profile") == "profile" else None
    layers = (profile_layer_scales(profile[1])
              if profile and getattr(args, "kv_layer_scales", "profile") == "profile" else None)
    if taken or scales or layers:
        shown = " ".join([f"{k}={v}" for k, v in taken.items()] + (["channel scales"] if scales else [])
                         + (["layer scales"] if layers else []))
        print(f"packkv: using the tuned profile {profile[0]} ({shown}); --kv-* flags override it", file=sys.stderr)
    sink = sink_bounds(getattr(args, "kv_sink", None), profile[1].get("sink") if profile else None)
    tokens = sink_tokens_for(getattr(args, "kv_sink_tokens", None), profile[1].get("sink_tokens") if profile else None,
                             sink)
    return {"params": params, "window": window, **({"scales": scales} if scales else {}),
            **({"sink": sink} if sink else {}), **({"sink_tokens": tokens} if tokens else {}),
            **({"layer_scales": layers} if layers else {})}


def sink_token_count(flag: int | None, from_profile) -> int | None:
    """How many first tokens are at the sink bounds: --kv-sink-tokens N, else the profile's, else None (the
    whole first block)."""
    chosen = flag if flag is not None else from_profile
    return None if chosen is None else checked_sink_tokens(chosen, "--kv-sink-tokens")


def sink_tokens_for(flag: int | None, from_profile, sink) -> int | None:
    """sink_token_count for a cache with these sink bounds: None without any, where --kv-sink-tokens is an
    error (it would have nothing to choose)."""
    if sink is None:
        if flag is not None:
            raise PackkvError("--kv-sink-tokens needs sink bounds: --kv-sink rel_k,rel_v, or a profile that has them")
        return None
    return sink_token_count(flag, from_profile)


def sink_bounds(flag: str | None, from_profile) -> tuple[float, float] | None:
    """(rel_k, rel_v) of the first block: --kv-sink 'rk,rv' or 'none', else the profile's [rk, rv]."""
    if flag is None:
        chosen = from_profile
    elif flag == "none":
        return None
    else:
        try:
            chosen = [float(x) for x in flag.split(",")]
        except ValueError:
            raise PackkvError(f"--kv-sink: cannot read {flag!r} as rel_k,rel_v") from None
    if chosen is None:
        return None
    if len(chosen) != 2 or not all(codec.MIN_REL <= r <= 1 for r in chosen):
        raise PackkvError(f"--kv-sink: two bounds in [2**-12, 1] (rel_k,rel_v), not {chosen}")
    return float(chosen[0]), float(chosen[1])


def profile_scales(profile: dict) -> ChannelScales | None:
    """The channel scales a profile holds ({"k": [[[...]]], "v": ...}, [layers][kv_heads][head_dim]), if any."""
    return _profile_kv_pair(profile, "channel_scales", ChannelScales)


def profile_layer_scales(profile: dict) -> LayerScales | None:
    """The per-layer bound multipliers a profile holds ({"k": [...], "v": [...]}, one per layer), if any."""
    return _profile_kv_pair(profile, "layer_scales", LayerScales)


def _profile_kv_pair(profile: dict, key: str, kind):
    """kind(saved["k"], saved["v"]) of the profile's entry `key`, None without one, a clear error if unreadable."""
    saved = profile.get(key)
    if saved is None:
        return None
    try:
        return kind(saved["k"], saved["v"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PackkvError(f"the profile's {key} cannot be read: {exc}") from exc


# ---- tuned profiles ---------------------------------------------------------------------------------

def weights_folder(weights: str | None) -> Path:
    """Where the weights live (or will, once imported), without loading or importing anything."""
    from packkv.weights.default import DEFAULT_MODEL, cache_dir
    if weights is None:
        return cache_dir() / DEFAULT_MODEL
    path = Path(weights)
    return cache_dir() / path.stem if path.suffix == ".gguf" else path


def profile_paths(weights: str | None) -> list[Path]:
    """Where a model's profile is looked for, in order: next to the weights, then in the cache folder."""
    from packkv.weights.default import cache_dir
    folder = weights_folder(weights).resolve()
    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:10]
    return [folder / PROFILE_NAME, cache_dir() / "profiles" / f"{folder.name}-{tag}.json"]


def read_profile(path: Path) -> dict:
    try:
        profile = json.loads(Path(path).read_text())
        if not isinstance(profile.get("params"), dict):
            raise ValueError("no 'params' object")
    except (OSError, ValueError) as exc:
        raise PackkvError(f"cannot read the packkv profile {path}: {exc}") from exc
    return profile


def find_profile(weights: str | None, choice: str | None = None) -> tuple[Path, dict] | None:
    """(path, profile) for the model, or None. choice: None (look in the usual places), 'none', or a path."""
    if choice == "none":
        return None
    if choice is not None:
        return Path(choice), read_profile(Path(choice))
    for path in profile_paths(weights):
        if path.is_file():
            return path, read_profile(path)
    return None


def save_profile(weights: str | None, profile: dict, path: str | None = None) -> Path:
    """Write a profile to `path`, else next to the weights, else (not writable) into the cache folder."""
    candidates = [Path(path)] if path else profile_paths(weights)
    text = json.dumps(profile, indent=2) + "\n"
    problems = []
    for target in candidates:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(target.parent, os.W_OK):
                raise PermissionError(f"{target.parent} is not writable")
            target.write_text(text)
            return target
        except OSError as exc:
            problems.append(f"{target}: {exc}")
    raise PackkvError("cannot save the packkv profile: " + "; ".join(problems))
