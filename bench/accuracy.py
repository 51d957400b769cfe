"""packkv's accuracy on SmolLM2 against the dense cache and the KIVI-style quant baseline.

    python bench/accuracy.py [--device cpu] [--work DIR] [--reuse] [--steps tune,kl,passkey,sweep]

Every number comes from a `python -m packkv.eval` run whose command is recorded beside it:
  tune     on brown.txt (the calibration text): packkv's parameters of highest compression within the
           targets' budget (+1% perplexity, KL 0.02 nats), saved as a profile;
  kl       on kjv.txt, never used for tuning, with that profile: perplexity and KL against the dense
           cache, top-1 agreement, compression ratios;
  passkey  retrieval at 1K, 2K, 4K and 8K tokens x 3 depths, dense and packkv (same keys);
  sweep    on kjv.txt: packkv's bounds and quant's bits/groups, compression ratio against perplexity
           increase and KL (bench/results/sweep.json, sweep.png), and packkv's ratio against quant's
           at equal perplexity increase (at 4-bit quant's, and at 1%);
then bench/results/accuracy.json: the numbers against the targets, with the commands, and a Markdown
table for the README on stdout. Intermediate JSON goes to --work; --reuse keeps what is there.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, header, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION, EVALUATION = "../shared/data/brown.txt", "../shared/data/kjv.txt"
BUDGET_PPL, BUDGET_KL, TARGET_RATIO, TARGET_OVER_QUANT = 1.0, 0.02, 6.0, 1.5
WINDOWS = ["--ctx", "2048", "--windows", "3", "--prefill", "512"]               # 4608 scored tokens
CALIBRATION_WINDOWS = ["--ctx", "2048", "--windows", "2", "--prefill", "512"]   # 3072 scored tokens
TUNE_GRID = ["--rel-k", "0.02,0.03,0.04,0.05,0.07,0.1", "--rel-v", "0.05,0.08,0.12,0.16,0.2,0.3"]
PASSKEY = ["--lengths", "1024,2048,4096,8192", "--depths", "0.1,0.5,0.9"]
SWEEP_PAIRS = {   # (rel_k, rel_v) per granularity: along rel_v = 2 rel_k (the codec's default shape) and 4 rel_k
    "token-layer": "0.01:0.02,0.02:0.04,0.03:0.06,0.05:0.1,0.1:0.2,0.02:0.08,0.04:0.16",
    "token-head": "0.02:0.04,0.03:0.06,0.05:0.1,0.02:0.08,0.03:0.12,0.05:0.2",
}


def steps(work: Path, device: str) -> dict[str, list[list[str]]]:
    """The eval commands of every step (arguments after `python -m packkv.eval`)."""
    profile = str(work / "profile.json")
    common = ["--device", device]
    packkv = ["--cache", "packkv", "--kv-profile", profile]
    sweeps = [["sweep", "--text", EVALUATION, *WINDOWS, *common, "--granularities", g, "--pairs", pairs,
               "--bits", "2,4" if i == 0 else "", "--groups", "32,64", "--json", str(work / f"sweep-{g}.json")]
              for i, (g, pairs) in enumerate(SWEEP_PAIRS.items())]   # the quant points in the first run only
    return {
        "tune": [["tune", "--text", CALIBRATION, *CALIBRATION_WINDOWS, *common, "--budget-ppl", str(BUDGET_PPL),
                  "--budget-kl", str(BUDGET_KL), *TUNE_GRID, "--profile-out", profile, "--json", str(work / "tune.json")]],
        "kl": [["kl", "--text", EVALUATION, *WINDOWS, *common, *packkv, "--json", str(work / "kl.json")]],
        "passkey": [["passkey", *PASSKEY, *common, "--cache", "dense", "--json", str(work / "passkey-dense.json")],
                    ["passkey", *PASSKEY, *common, *packkv, "--json", str(work / "passkey-packkv.json")]],
        "sweep": sweeps,
    }


def output(command: list[str]) -> Path:
    return Path(command[command.index("--json") + 1])


def run_step(command: list[str]) -> None:
    print("+ python -m packkv.eval " + shlex.join(command), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "packkv.eval", *command], cwd=ROOT, check=True)


def merge_sweeps(parts: list[dict]) -> dict:
    """One sweep from the per-granularity runs (same text, windows and dense reference)."""
    from packkv.eval import comparisons
    merged = {**parts[0], "points": [p for part in parts for p in part["points"]],
              "commands": [part["command"] for part in parts]}
    del merged["command"]
    return {**merged, **comparisons(merged["points"])}


def summarize(r: dict) -> dict:
    kl, tune = r["kl"][0], r["tune"][0]
    dense_pk, packkv_pk = r["passkey"]
    at_8k = [t["compression_ratio"] for t in packkv_pk["trials"] if t["length"] == 8192]
    sweep = r["sweep"]
    comparison = sweep["comparison"]
    ratio_8k = sum(at_8k) / len(at_8k) if at_8k else None
    targets = {
        "compression_ratio_at_8k_tokens": {"target": f">= {TARGET_RATIO}", "measured": ratio_8k,
                                           "met": ratio_8k is not None and ratio_8k >= TARGET_RATIO},
        "compressed_blocks_ratio": {"target": f">= {TARGET_RATIO}", "measured": kl["block_compression_ratio"],
                                    "met": kl["block_compression_ratio"] >= TARGET_RATIO},
        "ppl_increase_pct": {"target": f"<= {BUDGET_PPL}", "measured": kl["ppl_increase_pct"],
                             "met": kl["ppl_increase_pct"] <= BUDGET_PPL},
        "kl": {"target": f"< {BUDGET_KL}", "measured": kl["kl"], "met": kl["kl"] < BUDGET_KL},
        "passkey_equal_to_dense": {
            "target": "packkv == dense at every length", "measured": {"dense": dense_pk["by_length"],
                                                                       "packkv": packkv_pk["by_length"]},
            "met": all(packkv_pk["by_length"][n] >= a for n, a in dense_pk["by_length"].items())},
    }
    for prefix, key in (("", "comparison"), ("kl_", "comparison_kl")):
        for name, c in sweep[key].items():
            targets[f"packkv_over_quant_at_{prefix}{name}"] = {
                "target": f">= {TARGET_OVER_QUANT}", "measured": c["packkv_over_quant"],
                "met": c["packkv_over_quant"] is not None and c["packkv_over_quant"] >= TARGET_OVER_QUANT}
    return {"profile": tune["profile"], "evaluation": {k: kl[k] for k in (
        "ppl", "dense_ppl", "ppl_increase_pct", "kl", "top1_agreement", "compression_ratio",
        "block_compression_ratio", "tokens", "windows")}, "compression_ratio_at_8k_tokens": ratio_8k,
        "passkey": {"dense": dense_pk["by_length"], "packkv": packkv_pk["by_length"]},
        "comparison": comparison, "comparison_kl": sweep["comparison_kl"], "targets": targets}


def markdown(summary: dict, commands: dict) -> str:
    s, t = summary, summary["targets"]
    e, c = s["evaluation"], s["comparison"]

    def x(v, digits=2):
        return "n/a" if v is None else f"{v:.{digits}f}"

    def ok(name):
        return "yes" if t[name]["met"] else "**no**"

    rows = [
        "| measure (SmolLM2-135M-Instruct, CPU) | packkv | target | met |",
        "|---|---|---|---|",
        f"| compression ratio, compressed blocks (every byte) | {x(e['block_compression_ratio'])}x | >= 6x | "
        f"{ok('compressed_blocks_ratio')} |",
        f"| compression ratio, whole cache at 8K tokens (fp16 window included) | "
        f"{x(s['compression_ratio_at_8k_tokens'])}x | >= 6x | {ok('compression_ratio_at_8k_tokens')} |",
        f"| perplexity on kjv.txt vs dense ({x(e['dense_ppl'], 4)}) | {x(e['ppl'], 4)} "
        f"({e['ppl_increase_pct']:+.2f}%) | <= +1% | {ok('ppl_increase_pct')} |",
        f"| mean KL to dense (nats); top-1 agreement | {x(e['kl'], 4)}; {100 * e['top1_agreement']:.1f}% | < 0.02 | "
        f"{ok('kl')} |",
    ]
    for name, label in (("quant_4bit", "4-bit quant's"), ("1pct", "1%")):
        if name in c:
            rows.append(f"| ratio at {label} perplexity increase ({c[name]['ppl_increase_pct']:+.2f}%): packkv vs "
                        f"quant | {x(c[name]['packkv_ratio'])}x vs {x(c[name]['quant_ratio'])}x = "
                        f"{x(c[name]['packkv_over_quant'])} | >= 1.5 | {ok('packkv_over_quant_at_' + name)} |")
    for name, label in (("quant_4bit", "4-bit quant's"), ("kl_0.02", "0.02 nats")):
        ck = s["comparison_kl"][name]
        rows.append(f"| ratio at {label} KL ({ck['kl']:.4f}): packkv vs quant | {x(ck['packkv_ratio'])}x vs "
                    f"{x(ck['quant_ratio'])}x = {x(ck['packkv_over_quant'])} | (>= 1.5) | "
                    f"{ok('packkv_over_quant_at_kl_' + name)} |")
    lengths = s["passkey"]["dense"]
    rows += ["", "| passkey retrieval | " + " | ".join(f"{int(n) // 1024}K" for n in lengths) + " |",
             "|---|" + "---|" * len(lengths),
             "| dense | " + " | ".join(f"{a:.0f}%" for a in lengths.values()) + " |",
             "| packkv (tuned profile) | " + " | ".join(f"{s['passkey']['packkv'][n]:.0f}%" for n in lengths) + " |"]
    rows += ["", "Commands:", "```"] + [line for lines in commands.values() for line in lines] + ["```"]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--work", default="/tmp/packkv-accuracy", help="intermediate JSON and the tuned profile")
    ap.add_argument("--reuse", action="store_true", help="keep the results of steps already in --work")
    ap.add_argument("--steps", default="tune,kl,passkey,sweep")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    plan = steps(work, args.device)
    for name in args.steps.split(","):
        for command in plan[name]:
            if not (args.reuse and output(command).is_file()):
                run_step(command)
    missing = [str(output(c)) for cmds in plan.values() for c in cmds if not output(c).is_file()]
    if missing:
        print(f"not summarized yet: missing {', '.join(missing)}", file=sys.stderr)
        return 0
    results = {name: [json.loads(output(c).read_text()) for c in cmds] for name, cmds in plan.items()}
    sweep = merge_sweeps(results["sweep"])
    from packkv.eval import plot_sweep
    plot_sweep(sweep, RESULTS / "sweep.png")
    write_json("sweep.json", sweep)
    results["sweep"] = sweep
    commands = {name: [r["command"] for r in (rs if isinstance(rs, list) else [])] for name, rs in results.items()}
    commands["sweep"] = sweep["commands"]
    summary = summarize({**results, "sweep": sweep})
    write_json("accuracy.json", {**header(results["kl"][0]["device"]), **summary, "commands": commands,
                                 "profile_command_note": "without --profile-out, tune saves the profile next to "
                                 "the weights, where eval and generate find it with no --kv-profile flag"})
    print(markdown(summary, commands))
    return 0


if __name__ == "__main__":
    sys.exit(main())
