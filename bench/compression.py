"""Compressed size of real KV under every packkv parameter, beside KIVI-style group quantization.

    python bench/compression.py [--weights DIR] [--text FILE] [--tokens 2048]

The KV of the first N tokens of a text (SmolLM2 by default, run on the CPU or GPU), compressed with
each (rel_k, rel_v), granularity, repack method, pack size and block size; every stored byte counted
(bits per element of K and V), the zero-order entropy of the quantized levels beside them, and the
sizes of KIVI's 2- and 4-bit group quantization. Sizes do not depend on the device. Writes
bench/results/compression.json and compression.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_TEXT, RESULTS, header, print_table, write_json  # noqa: E402

from packkv.codec import CodecParams, GRANULARITIES, PACK_SIZES, REPACK_METHODS  # noqa: E402
from packkv.eval import KIVI_SETTINGS, collect_kv, kivi_bits_per_element, measure_compression, text_tokens  # noqa: E402
from packkv.generate import Engine  # noqa: E402

REL_PAIRS = [(0.025, 0.05), (0.05, 0.1), (0.1, 0.2), (0.2, 0.4)]


def configurations():
    default = CodecParams()
    seen = set()
    grid = [CodecParams(rel_k=rk, rel_v=rv) for rk, rv in REL_PAIRS]
    grid += [CodecParams(granularity=g, repack=r) for g in GRANULARITIES for r in REPACK_METHODS]
    grid += [CodecParams(pack=p) for p in PACK_SIZES] + [CodecParams(block=128)]
    for params in [default] + grid:
        if params not in seen:
            seen.add(params)
            yield params


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 5))
    labels = [r["label"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["k_bits"] for r in rows], 0.4, label="K, every byte")
    ax.bar([i + 0.2 for i in x], [r["v_bits"] for r in rows], 0.4, label="V, every byte")
    ax.scatter([i - 0.2 for i in x], [r["k_entropy"] for r in rows], marker="_", s=200, color="k",
               label="entropy of levels", zorder=3)
    ax.scatter([i + 0.2 for i in x], [r["v_entropy"] for r in rows], marker="_", s=200, color="k", zorder=3)
    for (bits, group), style in zip(KIVI_SETTINGS, [":", "--", "-.", "-"]):
        ax.axhline(kivi_bits_per_element(bits, group), color="gray", ls=style, lw=1,
                   label=f"KIVI {bits}-bit, group {group}")
    ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("bits per element")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def label(p: CodecParams) -> str:
    return f"k{p.rel_k}/v{p.rel_v} {p.granularity} {p.repack} P{p.pack} B{p.block}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    args = ap.parse_args()
    engine = Engine(args.weights, args.device)
    k, v = collect_kv(engine, text_tokens(engine, args.text, args.tokens))
    records, rows = [], []
    for params in tqdm(list(configurations()), desc="configurations", file=sys.stderr):
        result = measure_compression(k, v, params)
        records.append(result)
        rows.append({"label": label(params), "ratio": result["compression_ratio"],
                     "k_bits": result["bits_per_element"]["k"], "v_bits": result["bits_per_element"]["v"],
                     "k_entropy": result["entropy_bits"]["k"], "v_entropy": result["entropy_bits"]["v"]})
    print_table(rows, ["label", "ratio", "k_bits", "v_bits", "k_entropy", "v_entropy"])
    payload = {**header(engine.backend.device_name), "model": Path(args.weights or "smollm2-135m").name,
               "text": args.text.name, "tokens": args.tokens, "records": records,
               "kivi_bits_per_element": {f"{b}bit_g{g}": kivi_bits_per_element(b, g) for b, g in KIVI_SETTINGS}}
    write_json("compression.json", payload)
    plot(rows, RESULTS / "compression.png", f"SmolLM2-135M KV, {args.tokens} tokens of {args.text.name}: "
                                            "bits per element, every byte counted")


if __name__ == "__main__":
    main()
