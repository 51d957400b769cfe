"""Where a decode step's time goes: the graph's GPU time against the whole step, and each kernel's time.

    python bench/step_profile.py --model smollm2 --context 8000 --caches dense packkv quant
    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \\
        python bench/step_profile.py --model smollm2 --context 8000 --caches packkv --kernels  > ncu.csv
    python bench/step_profile.py --ncu-csv ncu.csv --out step_profile.json   (merges the kernel table)

Per cache kind, after a prefill of --context tokens (SmolLM2: a real prompt; a random-weight shape:
random K/V), three times per decode step, each the mean over --steps steps:
  step_us      a whole decode step as generate runs it (greedy: packkv.generate.decode_steps, pipelined
               up to PIPELINE_DEPTH steps ahead of the host on a graph), the cache's bookkeeping and the encoder included;
  graph_us     graph replays alone, back to back (the GPU time of one step, launch gaps included);
  host_us      step_us - graph_us: what the host adds per token (about 0 when the pipeline hides it; the
               two are separate measurements, so it can come out a little negative).
--pdl both times each cache kind with graphs captured without, then with programmatic dependent launches,
on the same cache: the second mode starts --steps + ~12 tokens later (`context` is where each started).
--depths 2 3 likewise times the greedy pipeline at each depth (GraphDecoder.PIPELINE_DEPTH) in turn.
With --kernels, one eager decode step per cache kind runs between cudaProfilerStart/Stop, so that Nsight
Compute times each kernel alone (serialised: the sum is not the graph's time, but the shares are the
kernels'). --ncu-csv folds such a CSV into per-kernel totals per step.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_TEXT, RESULTS, graph_replay_us, header, print_table, write_json  # noqa: E402


def prefilled_cache(engine, real: bool, text: Path, context: int, kind: str, steps: int):
    """`steps`: the decode steps it must hold past the context."""
    from generate import fill_random, prompt_of_length
    from packkv.generate import prefill
    cache = engine.new_cache(kind, batch=1, tokens=context + steps)
    if real:
        prefill(engine, prompt_of_length(engine, text, context), cache, show_progress=False)
    else:
        fill_random(engine, cache, context)
    return cache


def time_steps(engine, cache, steps: int) -> dict:
    from generate import timed_decode
    from packkv.generate import GraphDecoder, make_decoder
    decoder = make_decoder(engine, cache)
    tok_s, _ = timed_decode(engine, cache, [1], steps, decoder)
    out = {"step_us": 1e6 / tok_s, "tok_s": tok_s}
    if isinstance(decoder, GraphDecoder):
        out["graph_us"] = graph_replay_us(decoder, steps)
        out["host_us"] = out["step_us"] - out["graph_us"]
    return out


def profile_one_step(engine, cache) -> None:
    """One eager decode step inside the profiler's window (Nsight Compute's --profile-from-start off)."""
    import cupy
    engine.backend.synchronize()
    cupy.cuda.runtime.profilerStart()
    engine.model.forward_step(cupy.asarray([[1]], dtype=np.int32), cache)
    engine.backend.synchronize()
    cupy.cuda.runtime.profilerStop()


def fold_ncu_csv(text: str) -> list[dict]:
    """Nsight Compute's --csv rows (one per kernel launch and metric) -> per kernel name: launches, total
    and mean microseconds, largest first. The launches of all profiled steps are summed."""
    lines = text[text.find('"ID"'):]
    totals, counts = defaultdict(float), defaultdict(int)
    for row in csv.DictReader(io.StringIO(lines)):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"].split("(")[0].split("<")[0]
        scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(row["Metric Unit"], 1e-3)
        totals[name] += float(row["Metric Value"].replace(",", "")) * scale
        counts[name] += 1
    rows = [{"kernel": k, "launches": counts[k], "total_us": totals[k], "mean_us": totals[k] / counts[k]}
            for k in totals]
    return sorted(rows, key=lambda r: -r["total_us"])


def main() -> None:
    from generate import PRESETS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", *PRESETS])
    ap.add_argument("--weights")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--context", type=int, default=8000)
    ap.add_argument("--caches", nargs="+", default=["dense", "packkv", "quant"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pdl", choices=["on", "off", "both"], default="on",
                    help="graphs captured with programmatic dependent launches (kernels/launch.py), without, or "
                         "both side by side (each cache kind timed without, then with)")
    ap.add_argument("--depths", type=int, nargs="+",
                    help="GraphDecoder.PIPELINE_DEPTH values to time side by side (default: the decoder's own)")
    ap.add_argument("--kernels", action="store_true", help="one eager step per cache inside the profiler window")
    ap.add_argument("--ncu-csv", type=Path, help="fold this Nsight Compute CSV into --out and exit")
    ap.add_argument("--out", default="step_profile.json")
    args = ap.parse_args()

    path = RESULTS / args.out
    if args.ncu_csv:
        payload = json.loads(path.read_text())
        payload["kernels"] = fold_ncu_csv(args.ncu_csv.read_text())
        payload["kernels_note"] = "Nsight Compute, serialised launches, one eager decode step per cache kind listed"
        print_table(payload["kernels"], ["kernel", "launches", "total_us", "mean_us"])
        write_json(args.out, payload)
        return

    from packkv.generate import Engine, GraphDecoder
    from packkv.kernels import launch
    real = args.model == "smollm2"
    modes = [(pdl, depth) for pdl in {"on": [True], "off": [False], "both": [False, True]}[args.pdl]
             for depth in args.depths or [GraphDecoder.PIPELINE_DEPTH]]
    steps_held = len(modes) * (args.steps + 12) + 4         # per mode: 8 warm-up and the timed steps, +2 each
    engine = Engine(args.weights, device="gpu", max_context=None if real else args.context + steps_held,
                    random_weights=None if real else args.model)
    records = []
    for kind in args.caches:
        cache = prefilled_cache(engine, real, args.text, args.context, kind, steps_held)
        if args.kernels:
            profile_one_step(engine, cache)
            continue
        for pdl, depth in modes:
            launch.PDL = pdl                                  # read when make_decoder captures the graph
            GraphDecoder.PIPELINE_DEPTH = depth
            time_steps(engine, cache, 8)                     # warm-up: compile, capture
            records.append({"cache": kind, "context": int(cache.lengths[0]), "pdl": pdl, "pipeline_depth": depth,
                            **time_steps(engine, cache, args.steps)})
            print(f"  {kind}: {records[-1]}", file=sys.stderr, flush=True)
    if args.kernels:
        return
    print_table(records, ["cache", "context", "pdl", "pipeline_depth", "tok_s", "step_us", "graph_us", "host_us"])
    write_json(args.out, {**header(engine.backend.device_name), "model": "smollm2-135m" if real else args.model,
                          "weights": "real" if real else "random", "kv_data": "real" if real else "random",
                          "steps": args.steps, "records": records})


if __name__ == "__main__":
    main()
