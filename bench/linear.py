"""The decode GEMVs of one transformer layer: the warp-per-feature kernel against the tensor-core one.

    python bench/linear.py [--model llama-3.1-8b] [--rows 1 2 4 8 16]

One layer's four products of a decode step with `rows` sequences, as packkv's forward pass calls them
(kernels/model_ops.py: linear_rows): q/k/v (plain), o (added into the fp32 residual stream), gate/up
(SiLU(gate) * up fused) and down (residual), random fp16 weights of the model's shape. Each kernel
("warp": a warp per output feature on CUDA cores; "mma": linear_rows_mma on tensor cores) is timed as
a CUDA graph of the four launches (every weight matrix but o exceeds the 50 MB L2, and the four together
stream ~440 MB for the 8B shape, so nothing stays cached between replays). Reported per layer: us,
weight GB/s, and that over the device-to-device copy bandwidth measured in the same run
(`bound_fraction`, 1.0 = the weights stream at copy speed). Writes bench/results/<out>.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_gbps, graph_time_us, header, print_table, write_json  # noqa: E402

from packkv.backend import get_backend  # noqa: E402
from packkv.kernels import model_ops  # noqa: E402
from packkv.weights.random import PRESETS, random_config  # noqa: E402


def layer_weights(cupy, config) -> dict:
    """One layer's weight matrices [out, in], fp16, random on the device."""
    H, I = config.hidden_size, config.intermediate_size
    qkv_out = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
    shapes = {"qkv": (qkv_out, H), "o": (H, config.num_attention_heads * config.head_dim),
              "gate_up": (2 * I, H), "down": (H, I)}
    rng = cupy.random.default_rng(0)
    return {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            for name, shape in shapes.items()}


def layer_launches(cupy, weights: dict, rows: int, kernel: str) -> list:
    """The layer's four products for `rows` sequences, as packkv's forward pass calls them."""
    rng = cupy.random.default_rng(rows)
    x = {name: rng.standard_normal((rows, w.shape[1]), dtype=np.float32).astype(np.float16)
         for name, w in weights.items()}
    residual = cupy.zeros((rows, weights["o"].shape[0]), np.float32)

    def call(name, **kw):
        return lambda: model_ops.linear_rows(x[name], weights[name], kernel=kernel, **kw)

    return [call("qkv"), call("o", residual=residual), call("gate_up", swiglu=True), call("down", residual=residual)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--out", default="linear.json")
    args = ap.parse_args()
    import cupy

    bandwidth = copy_gbps(cupy)
    weights = layer_weights(cupy, random_config(args.model))
    weight_bytes = sum(w.nbytes for w in weights.values())
    records = []
    for rows in args.rows:
        for kernel in ("warp", "mma"):
            if kernel == "warp" and rows > model_ops.WARP_KERNEL_MAX_ROWS:
                continue
            us_per_call, graphed = graph_time_us(cupy, layer_launches(cupy, weights, rows, kernel))
            us = 4 * us_per_call
            gbps = weight_bytes / us / 1e3
            records.append({"model": args.model, "rows": rows, "kernel": kernel, "us_per_layer": us,
                            "weight_gbps": gbps, "bound_fraction": gbps / bandwidth, "cuda_graph": graphed})
            print(f"rows {rows:2d} {kernel:4s}: {us:8.1f} us/layer, {gbps:7.1f} GB/s", file=sys.stderr)
    print_table(records, ["rows", "kernel", "us_per_layer", "weight_gbps", "bound_fraction"])
    write_json(args.out, {**header(get_backend("gpu").device_name),
                          "command": "python bench/linear.py " + " ".join(sys.argv[1:]), "copy_gbps": bandwidth,
                          "weight_bytes_per_layer": weight_bytes, "records": records})


if __name__ == "__main__":
    main()
