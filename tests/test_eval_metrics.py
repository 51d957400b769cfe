"""`python -m packkv.eval` ppl, kl, passkey, sweep and tune on a tiny random Llama with a character
tokenizer: the metrics against values computed here independently, the dense cache against itself,
tune within its budget (and generate/eval using its profile), and bad input as one-line errors."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models

from packkv import codec
from packkv.eval import (ANSWER_TOKENS, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, compare_families,
                         frontier, main, passkey_prompt, ratio_at)
from packkv.generate import Engine, main as generate_main
from packkv.model import LlamaConfig
from packkv import options
from packkv.options import PROFILE_NAME
from packkv.quant import QuantParams
from packkv.weights import expected_tensors

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,?"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 48, "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 512, "eos_token_id": 47}
CTX, WINDOWS, PREFILL = 160, 2, 48
FAST = ["--kv-window", "16", "--kv-block", "16", "--kv-pack", "16"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (2 KV heads x head_dim 16: quant groups of 32 tile its channels), a character
    tokenizer, and a text of made-up words."""
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    rng = np.random.default_rng(0)
    shapes = expected_tensors(LlamaConfig.from_hf(CONFIG))
    save_file({name: (np.ones(shape) if "norm" in name else rng.standard_normal(shape) * 0.3).astype(np.float32)
               for name, shape in shapes.items()}, str(folder / "model.safetensors"))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(folder / "tokenizer.json"))
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]
    text = folder / "text.txt"
    text.write_text(" ".join(rng.choice(words, 2000)) + ".")
    return folder, text


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured


def eval_json(capsys, tmp_path, *args):
    out = tmp_path / "out.json"
    code, captured = run(capsys, *args, "--device", "cpu", "--json", out)
    assert code == 0, captured.err
    return json.loads(out.read_text())


def window_args(folder, text):
    return ["--weights", folder, "--text", text, "--ctx", CTX, "--windows", WINDOWS, "--prefill", PREFILL]


def log_softmax64(logits):
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def dense_log_probs(folder, text):
    """Each window in one dense forward pass, log-probabilities of the scored positions in float64."""
    engine = Engine(str(folder), "cpu")
    ids = engine.tokenizer.encode(text.read_text())[:CTX * WINDOWS]
    out = []
    for w in range(WINDOWS):
        window = ids[w * CTX:(w + 1) * CTX]
        cache = engine.new_cache("dense", 1, CTX)
        logits = engine.model.forward(np.asarray([window[:-1]]), cache, all_logits=True)[0]
        out.append((log_softmax64(logits)[PREFILL - 1:], np.asarray(window[PREFILL:])))
    return engine, ids, out


# ---- the metrics against independent computations -------------------------------------------------

def test_ppl_is_exp_of_the_mean_nll(tiny, capsys, tmp_path):
    folder, text = tiny
    _, _, windows = dense_log_probs(folder, text)
    nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in windows])
    result = eval_json(capsys, tmp_path, "ppl", *window_args(folder, text), "--cache", "dense")
    assert result["tokens"] == WINDOWS * (CTX - PREFILL) == nll.size
    assert result["ppl"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert result["nll"] == pytest.approx(nll.mean(), rel=1e-5)
    assert result["cache"] == "dense" and result["windows"]["ctx"] == CTX


def test_dense_against_dense_is_kl_0_and_agreement_1(tiny, capsys, tmp_path):
    folder, text = tiny
    result = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), "--cache", "dense")
    assert result["kl"] == 0 and result["top1_agreement"] == 1 and result["ppl"] == result["dense_ppl"]


def test_kl_and_agreement_by_hand(tiny, capsys, tmp_path):
    """The packkv cache run chunk by chunk here (the protocol of the module's docstring), KL and top-1
    computed in float64 against the dense one-pass log-probabilities."""
    folder, text = tiny
    engine, ids, dense = dense_log_probs(folder, text)
    params = codec.CodecParams(rel_k=0.3, rel_v=0.3, block=16, pack=16)
    chunk, kls, agree, nll = 8, [], [], []
    for w, (ref, targets) in enumerate(dense):
        window = ids[w * CTX:(w + 1) * CTX]
        cache = engine.new_cache("packkv", 1, CTX, params=params, window=16)
        engine.model.forward(np.asarray([window[:PREFILL - 1]]), cache)
        rows = [engine.model.forward(np.asarray([window[s:min(s + chunk, CTX - 1)]]), cache, all_logits=True)[0]
                for s in range(PREFILL - 1, CTX - 1, chunk)]
        test = log_softmax64(np.concatenate(rows))
        kls.append((np.exp(ref) * (ref - test)).sum(axis=-1))
        agree.append(ref.argmax(-1) == test.argmax(-1))
        nll.append(-test[np.arange(len(targets)), targets])
    result = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), "--cache", "packkv", *FAST,
                       "--kv-rel-k", 0.3, "--kv-rel-v", 0.3, "--chunk", chunk)
    assert result["kl"] == pytest.approx(np.concatenate(kls).mean(), rel=1e-3, abs=1e-6)
    assert result["kl"] > 1e-4
    assert result["top1_agreement"] == pytest.approx(np.concatenate(agree).mean())
    assert result["ppl"] == pytest.approx(np.exp(np.concatenate(nll).mean()), rel=1e-5)
    assert result["rel_k"] == 0.3 and result["window"] == 16 and result["chunk"] == chunk
    dense_nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in dense])
    assert result["dense_ppl"] == pytest.approx(np.exp(dense_nll.mean()), rel=1e-5)


def test_chunks_never_exceed_the_window(tiny, capsys, tmp_path):
    folder, text = tiny
    result = eval_json(capsys, tmp_path, "ppl", *window_args(folder, text), "--cache", "quant", "--kv-window", 4,
                       "--chunk", 32)
    assert result["chunk"] == 4 and result["cache"] == "quant" and result["bits"] == 2


def test_compression_ratios_count_every_byte(tiny, capsys, tmp_path):
    folder, text = tiny
    result = eval_json(capsys, tmp_path, "ppl", *window_args(folder, text), "--cache", "quant",
                       "--quant-bits", 4, "--kv-window", 16)
    # per window: CTX - 1 tokens held, blocks of 32 beyond the 16..47-token window
    held = CTX - 1
    blocks = (held - 16) // 32
    window_tokens = held - 32 * blocks
    token_fp16 = 2 * 2 * 32 * 2                                  # layers x (K, V) x channels x 2 bytes
    record = 8 * 32 + 2 * 32 * 32 * 4 // 8
    block_bytes = blocks * 2 * (record + 8)
    assert result["block_compression_ratio"] == pytest.approx(blocks * 32 * token_fp16 / block_bytes)
    assert result["compression_ratio"] == pytest.approx(held * token_fp16 / (block_bytes + window_tokens * token_fp16))


# ---- passkey ------------------------------------------------------------------------------------

def test_passkey_prompts_and_accuracy(tiny, capsys, tmp_path):
    folder, text = tiny
    engine = Engine(str(folder), "cpu")
    filler = engine.tokenizer.encode("the grass is green. ")
    needle = engine.tokenizer.encode(PASSKEY_NEEDLE.format(key=12345), add_special_tokens=False)
    head = len(engine.tokenizer.encode(PASSKEY_INTRO))
    question = engine.tokenizer.encode(PASSKEY_QUESTION, add_special_tokens=False)
    room = 300 - ANSWER_TOKENS - head - len(needle) - len(question)          # filler tokens
    for depth in (0, 0.5, 1):
        prompt = passkey_prompt(engine, filler, 300, depth, 12345)
        assert len(prompt) == 300 - ANSWER_TOKENS and prompt[-len(question):] == question
        at = next(i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle)
        assert at == head + round(depth * room)
        assert prompt[head:at] + prompt[at + len(needle):-len(question)] == (filler * 20)[:room]
    result = eval_json(capsys, tmp_path, "passkey", "--weights", folder, "--lengths", "300,400", "--depths", "0,1",
                       "--cache", "packkv", *FAST)
    trials = result["trials"]
    assert len(trials) == 4 and {t["length"] for t in trials} == {300, 400}
    assert result["accuracy"] == pytest.approx(100 * np.mean([t["correct"] for t in trials]))
    for t in trials:   # judged as documented: the first number in the answer is the key
        digits = "".join(c if c.isdigit() else " " for c in t["answer"]).split()
        assert t["correct"] == (bool(digits) and digits[0] == str(t["key"]))


# ---- sweep: frontier, interpolation, both families ------------------------------------------------

def test_frontier_and_interpolation_by_hand():
    pts = [(0.5, 3.0), (0.2, 2.0), (2.0, 5.0), (1.5, 2.5), (4.0, 4.0)]
    assert frontier(pts) == [(0.2, 2.0), (0.5, 3.0), (2.0, 5.0)]
    assert ratio_at(pts, 0.1) is None
    assert ratio_at(pts, 0.2) == 2.0
    assert ratio_at(pts, 1.0) == pytest.approx(3.0 + 0.5 / 1.5 * 2.0)
    assert ratio_at(pts, 9.0) == 5.0
    points = [{"cache": "quant", "bits": 4, "group": 32, "ppl_increase_pct": 0.5, "block_compression_ratio": 3.0},
              {"cache": "quant", "bits": 2, "group": 32, "ppl_increase_pct": 10.5, "block_compression_ratio": 5.0},
              {"cache": "packkv", "ppl_increase_pct": 0.25, "block_compression_ratio": 4.0},
              {"cache": "packkv", "ppl_increase_pct": 1.25, "block_compression_ratio": 8.0}]
    c = compare_families(points)
    assert c["quant_4bit"]["packkv_ratio"] == pytest.approx(5.0) and c["quant_4bit"]["quant_ratio"] == 3.0
    assert c["quant_4bit"]["ppl_increase_pct"] == 0.5
    assert c["1pct"]["packkv_ratio"] == pytest.approx(7.0) and c["1pct"]["quant_ratio"] == pytest.approx(3.1)
    assert c["1pct"]["packkv_over_quant"] == pytest.approx(7.0 / 3.1)


def test_sweep_measures_both_families_and_plots(tiny, capsys, tmp_path):
    folder, text = tiny
    plot = tmp_path / "sweep.png"
    result = eval_json(capsys, tmp_path, "sweep", *window_args(folder, text), *FAST, "--pairs", "0.05:0.2,0.2:0.2",
                       "--granularities", "token-layer", "--bits", "2,4", "--groups", "32,64", "--plot", plot)
    kinds = [(p["cache"], p.get("rel_k"), p.get("bits"), p.get("group")) for p in result["points"]]
    assert kinds == [("packkv", 0.05, None, None), ("packkv", 0.2, None, None), ("quant", None, 2, 32),
                     ("quant", None, 4, 32)]                      # group 64 does not tile 32 channels
    for p in result["points"]:
        assert p["ppl_increase_pct"] == pytest.approx(100 * (p["ppl"] / result["dense"]["ppl"] - 1))
        assert p["kl"] >= 0 and 0 <= p["top1_agreement"] <= 1 and p["block_compression_ratio"] > 1
    assert set(result["comparison"]) == {"quant_4bit", "1pct"} and set(result["comparison_kl"]) == {"quant_4bit",
                                                                                                   "kl_0.02"}
    assert result["comparison_kl"]["quant_4bit"]["kl"] == result["points"][-1]["kl"]   # 4-bit g32
    assert plot.stat().st_size > 10_000


# ---- tune and its profile -----------------------------------------------------------------------

def test_tune_respects_its_budget_and_its_profile_becomes_the_default(tiny, capsys, tmp_path):
    folder, text = tiny
    budget = 2.0
    grid = ["--rel-k", "0.02,0.1,0.4", "--rel-v", "0.02,0.1,0.4", "--granularities", "token-layer"]
    result = eval_json(capsys, tmp_path, "tune", *window_args(folder, text), *FAST, *grid, "--budget-ppl", budget)
    profile_path = folder / PROFILE_NAME
    assert result["profile_path"] == str(profile_path)
    profile = json.loads(profile_path.read_text())
    chosen = profile["params"]
    tried = result["tried"]
    assert 2 <= len(tried) <= 6                                  # the staircase: at most 3 + 3 evaluations
    passing = [t for t in tried if t["ppl_increase_pct"] <= budget]
    assert passing and all(t["within_budget"] == (t in passing) for t in tried)
    best = max(passing, key=lambda t: t["block_compression_ratio"])
    assert (best["rel_k"], best["rel_v"]) == (chosen["rel_k"], chosen["rel_v"])
    assert profile["calibration"]["ppl_increase_pct"] <= budget
    assert "channel_scales" not in profile and not any(t["channel_scales"] for t in tried)   # off by default
    try:
        # eval picks the profile up by default and says so; re-measured on the calibration text: within budget
        result = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), "--cache", "packkv",
                           "--kv-window", "16")
        assert (result["rel_k"], result["rel_v"], result["block"]) == (chosen["rel_k"], chosen["rel_v"], 16)
        assert not result["channel_scales"]
        assert result["ppl_increase_pct"] <= budget
        assert result["ppl_increase_pct"] == pytest.approx(profile["calibration"]["ppl_increase_pct"])
        # an explicit flag overrides it; --kv-profile none ignores it
        out = tmp_path / "gen.json"
        assert generate_main(["--weights", str(folder), "--device", "cpu", "--cache", "packkv", "--prompt",
                              "the cat " * 40, "--max-tokens", "2", "--kv-rel-v", "0.25", "--json", str(out)]) == 0
        err = capsys.readouterr().err
        assert "using the tuned profile" in err and str(profile_path) in err
        kv = json.loads(out.read_text())["stats"]["kv_params"]
        assert (kv["rel_k"], kv["rel_v"], kv["block"]) == (chosen["rel_k"], 0.25, chosen["block"])
        assert generate_main(["--weights", str(folder), "--device", "cpu", "--cache", "packkv", "--prompt", "the",
                              "--max-tokens", "1", "--kv-profile", "none", "--json", str(out)]) == 0
        assert "profile" not in capsys.readouterr().err
        assert json.loads(out.read_text())["stats"]["kv_params"]["rel_k"] == codec.CodecParams().rel_k
    finally:
        profile_path.unlink()


def test_tune_without_channel_scales_and_sweep_with_them(tiny, capsys, tmp_path):
    """--channel-scales off: no scales in the profile; on: scales calibrated on the same text, used by
    every point tried and saved; sweep --scales-from runs every packkv point twice, with and without the
    profile's scales, and the scales change what the cache reads."""
    folder, text = tiny
    grid = ["--rel-k", "0.1", "--rel-v", "0.2", "--granularities", "token-head", "--budget-ppl", "100"]
    plain = tmp_path / "plain.json"
    result = eval_json(capsys, tmp_path, "tune", *window_args(folder, text), *FAST, *grid, "--channel-scales", "off",
                       "--profile-out", plain)
    assert "channel_scales" not in json.loads(plain.read_text()) and not result["tried"][0]["channel_scales"]
    scaled = tmp_path / "scaled.json"
    result = eval_json(capsys, tmp_path, "tune", *window_args(folder, text), *FAST, *grid, "--channel-scales", "on",
                       "--kv-sink", "0.02,0.05", "--profile-out", scaled)
    assert json.loads(scaled.read_text())["sink"] == [0.02, 0.05] and result["tried"][0]["sink"] == [0.02, 0.05]
    k_scales = np.array(json.loads(scaled.read_text())["channel_scales"]["k"])
    assert k_scales.shape == (CONFIG["num_hidden_layers"], CONFIG["num_key_value_heads"], 16)
    assert result["tried"][0]["channel_scales"]
    result = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), *FAST, "--cache", "packkv",
                       "--kv-profile", scaled)
    assert result["channel_scales"] and result["sink"] == [0.02, 0.05]      # the profile's sink bounds
    sweep = eval_json(capsys, tmp_path, "sweep", *window_args(folder, text), *FAST, "--pairs", "0.1:0.2",
                      "--granularities", "token-head", "--bits", "", "--scales-from", scaled)
    points = sweep["points"]
    assert [p["channel_scales"] for p in points] == [False, True]
    assert points[0]["kl"] != points[1]["kl"]
    code, captured = run(capsys, "sweep", *window_args(folder, text), "--scales-from", plain, "--device", "cpu")
    assert code == 2 and "no channel scales" in captured.err


def test_tune_falls_back_on_the_cache_folder(tiny, capsys, tmp_path, monkeypatch):
    folder, text = tiny
    monkeypatch.setenv("PACKKV_CACHE", str(tmp_path / "cache"))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    for f in folder.iterdir():
        (readonly / f.name).symlink_to(f)
    writable = options.os.access     # tests may run as root, who can write anywhere: pretend
    monkeypatch.setattr(options.os, "access", lambda p, mode: Path(p) != readonly and writable(p, mode))
    result = eval_json(capsys, tmp_path, "tune", *window_args(readonly, text), *FAST, "--rel-k", "0.02",
                       "--rel-v", "0.02", "--granularities", "token-head", "--budget-ppl", 50)
    saved = result["profile_path"]
    assert saved.startswith(str(tmp_path / "cache" / "profiles")) and not (readonly / PROFILE_NAME).exists()
    assert generate_main(["--weights", str(readonly), "--device", "cpu", "--cache", "packkv", "--prompt", "the",
                          "--max-tokens", "1"]) == 0
    assert saved in capsys.readouterr().err


def test_tune_with_a_ratio_floor_picks_the_lowest_kl_at_that_ratio(tiny, capsys, tmp_path):
    """--min-ratio R: the walk follows the ratio's boundary (a point at R or more moves to a smaller rel_v,
    one below R to a larger rel_k) and the profile is the lowest KL among the points at R or more within
    the budget; with no such point, one line and exit code 2."""
    folder, text = tiny
    rel_k, rel_v = [0.02, 0.1, 0.4], [0.02, 0.1, 0.4]
    grid = ["--rel-k", ",".join(map(str, rel_k)), "--rel-v", ",".join(map(str, rel_v)), "--granularities",
            "token-layer", "--budget-ppl", "1000"]
    profile_path = tmp_path / "floor.json"
    # the floor: the median of the ratios a plain sweep of the grid gives, so some points meet it and some do not
    sweep = eval_json(capsys, tmp_path, "sweep", *window_args(folder, text), *FAST, *grid[:-2], "--bits", "")
    ratios = {(p["rel_k"], p["rel_v"]): p["block_compression_ratio"] for p in sweep["points"]}
    floor = float(np.median(list(ratios.values())))
    result = eval_json(capsys, tmp_path, "tune", *window_args(folder, text), *FAST, *grid, "--min-ratio", floor,
                       "--profile-out", profile_path)
    tried = result["tried"]
    assert 2 <= len(tried) <= 6
    i, j = 0, len(rel_v) - 1                                     # the walk, replayed from the sweep's ratios
    for t in tried:
        assert (t["rel_k"], t["rel_v"]) == (rel_k[i], rel_v[j])
        assert t["block_compression_ratio"] == pytest.approx(ratios[(rel_k[i], rel_v[j])])
        assert t["meets_ratio"] == (t["block_compression_ratio"] >= floor)
        i, j = (i, j - 1) if t["meets_ratio"] else (i + 1, j)
    best = min((t for t in tried if t["meets_ratio"]), key=lambda t: t["kl"])
    profile = json.loads(profile_path.read_text())
    assert (profile["params"]["rel_k"], profile["params"]["rel_v"]) == (best["rel_k"], best["rel_v"])
    assert profile["min_ratio"] == floor and profile["calibration"]["kl"] == best["kl"]
    code, captured = run(capsys, "tune", *window_args(folder, text), *FAST, *grid, "--min-ratio", "1000",
                         "--device", "cpu", "--profile-out", tmp_path / "none.json")
    assert code == 2 and captured.err.strip().splitlines()[-1].startswith("error: tune: no parameters tried reach")


def test_tune_says_when_nothing_fits(tiny, capsys):
    folder, text = tiny
    code, captured = run(capsys, "tune", *window_args(folder, text), *FAST, "--rel-k", "0.5", "--rel-v", "0.5",
                         "--granularities", "token-layer", "--budget-ppl", "0.0001", "--device", "cpu")
    assert code == 2 and captured.err.strip().splitlines()[-1].startswith("error: tune: no parameters tried")
    assert not (folder / PROFILE_NAME).exists()


# ---- bad input: one line, exit code 2 -------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["ppl", "--text", "{missing}"], ["--text file not found"]),
    (["ppl", "--ctx", "1024"], ["--ctx 1024", "context of 512"]),
    (["ppl", "--cache", "quant", "--quant-bits", "3"], ["bits must be one of"]),
    (["ppl", "--cache", "quant", "--quant-group", "48"], ["group must be one of"]),
    (["ppl", "--prefill", "200"], ["--prefill must be in 1..159"]),
    (["ppl", "--windows", "100"], ["fewer than the 16000"]),
    (["kl", "--cache", "packkv", "--kv-rel-k", "2"], ["rel_k"]),
    (["sweep", "--rel-k", "0.1,x"], ["--rel-k", "cannot read"]),
    (["sweep", "--pairs", "0.1:0.2,0.3"], ["--pairs", "cannot read"]),
    (["tune", "--budget-ppl", "0"], ["--budget-ppl must be > 0"]),
    (["tune", "--budget-ppl", "1", "--min-ratio", "0"], ["--min-ratio must be > 0"]),
    (["passkey", "--lengths", "1024"], ["longer than the model's context of 512"]),
    (["passkey", "--depths", "1.5"], ["--depths must be in [0, 1]"]),
    (["passkey", "--lengths", "100"], ["passkey length 100 is too short"]),
])
def test_bad_input_is_one_line(tiny, capsys, tmp_path, args, words):
    folder, text = tiny
    base = ["--weights", str(folder), "--device", "cpu"]
    base += [] if args[0] == "passkey" else ["--text", str(text), "--ctx", str(CTX), "--prefill", str(PREFILL)]
    args = [a.replace("{missing}", str(tmp_path / "none.txt")) for a in args]
    code, captured = run(capsys, args[0], *base, *args[1:])       # the flags under test come last and win
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])


def test_quant_cache_runs_the_tiny_model(tiny):
    """The quant kind in the model's own loop (prefill, decode) on the CPU: finite logits, blocks written."""
    folder, _ = tiny
    engine = Engine(str(folder), "cpu")
    cache = engine.new_cache("quant", 1, 200, params=QuantParams(4, 32), window=8)
    logits = engine.model.forward(np.arange(100)[None] % 40, cache)
    for t in range(4 + cache.DEFER_STEPS):   # the 4th decode step completes a block, the 12th commits it
        logits = engine.model.forward(np.asarray([[t]]), cache)
    assert np.isfinite(logits).all() and int(cache.n_blocks[0]) == 3


def test_layers_saves_per_layer_bounds_that_kl_and_tune_use(tiny, capsys, tmp_path):
    """`eval layers` measures each layer's K and V alone against dense, saves multipliers (one per layer,
    geometric mean 1) with the base bounds; kl with that profile reports them and differs from
    --kv-layer-scales none, which is the uniform run; tune --layer-scales-from keeps them."""
    folder, text = tiny
    profile = tmp_path / "layers.json"
    result = eval_json(capsys, tmp_path, "layers", *window_args(folder, text), *FAST, "--kv-rel-k", "0.1",
                       "--kv-rel-v", "0.3", "--kv-granularity", "token-head", "--kv-sink", "0.02,0.05",
                       "--profile-out", profile)
    saved = json.loads(profile.read_text())
    layers = CONFIG["num_hidden_layers"]
    assert len(saved["layer_scales"]["k"]) == len(saved["layer_scales"]["v"]) == layers
    assert np.exp(np.log(saved["layer_scales"]["k"]).mean()) == pytest.approx(1, abs=1e-6)
    assert (saved["params"]["rel_k"], saved["params"]["rel_v"], saved["sink"]) == (0.1, 0.3, [0.02, 0.05])
    assert all(kl >= saved["layer_sensitivity"]["floor_kl"] - 1e-12 for kl in result["kl_k"] + result["kl_v"])
    with_layers = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), *FAST, "--cache", "packkv",
                            "--kv-profile", profile)
    assert with_layers["layer_scales"] == saved["layer_scales"] and with_layers["sink"] == [0.02, 0.05]
    assert with_layers["kl"] == pytest.approx(result["results"]["per_layer"]["kl"])
    uniform = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), *FAST, "--cache", "packkv",
                        "--kv-profile", profile, "--kv-layer-scales", "none")
    assert uniform["layer_scales"] is None and uniform["kl"] == pytest.approx(result["results"]["uniform"]["kl"])
    assert uniform["kl"] != with_layers["kl"]
    tuned = tmp_path / "tuned.json"
    out = eval_json(capsys, tmp_path, "tune", *window_args(folder, text), *FAST, "--rel-k", "0.1", "--rel-v", "0.3",
                    "--granularities", "token-head", "--budget-ppl", "100", "--layer-scales-from", profile,
                    "--profile-out", tuned)
    assert json.loads(tuned.read_text())["layer_scales"] == saved["layer_scales"]
    assert out["tried"][0]["layer_scales"] == saved["layer_scales"]


def test_layers_in_context_steps_from_the_profiles_multipliers(tiny, capsys, tmp_path):
    """`eval layers --in-context`: the reference is the operating point (the --kv-profile's multipliers at its
    bounds, reproduced by kl with that profile), each layer's share is that KL minus the KL with its K (V)
    alone at --rel-floor, and the new multipliers are the old ones times (share / geometric mean)^-power
    (no clipping at --clip 100), at a geometric mean of 1; kl with the new profile reproduces its per_layer run."""
    folder, text = tiny
    first, second = tmp_path / "layers.json", tmp_path / "in-context.json"
    base = ["--kv-rel-k", "0.1", "--kv-rel-v", "0.3", "--kv-granularity", "token-layer", "--kv-sink", "0.02,0.05"]
    eval_json(capsys, tmp_path, "layers", *window_args(folder, text), *FAST, *base, "--profile-out", first)
    old = json.loads(first.read_text())["layer_scales"]
    result = eval_json(capsys, tmp_path, "layers", *window_args(folder, text), *FAST, "--kv-profile", first,
                       "--in-context", "--power", "0.5", "--clip", "100", "--profile-out", second)
    saved = json.loads(second.read_text())
    sens = saved["layer_sensitivity"]
    assert sens["in_context"] and sens["base_layer_scales"] == old and saved["sink"] == [0.02, 0.05]
    operating = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), *FAST, "--cache", "packkv",
                          "--kv-profile", first)
    assert sens["operating_kl"] == pytest.approx(operating["kl"])
    assert result["results"]["base"]["kl"] == pytest.approx(operating["kl"])
    for which in ("k", "v"):
        share = np.maximum(sens["operating_kl"] - np.asarray(result[f"kl_{which}"]), 0)
        np.testing.assert_allclose(sens[which], share)
        share = np.maximum(share, 0.01 * share.max())
        expected = np.asarray(old[which]) * share ** -0.5
        np.testing.assert_allclose(saved["layer_scales"][which], expected / np.exp(np.log(expected).mean()), rtol=1e-9)
    assert saved["layer_scales"] != old
    new = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), *FAST, "--cache", "packkv",
                    "--kv-profile", second)
    assert new["kl"] == pytest.approx(result["results"]["per_layer"]["kl"])


def test_spread_windows_sample_the_whole_text(tiny, capsys, tmp_path):
    """--spread: window i starts at the first line at or after character i/windows of the text (the first
    window is the consecutive run's first), the run records it; a text too short for a window is one line."""
    folder, text = tiny
    rng = np.random.default_rng(1)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home"]
    lines = [" ".join(rng.choice(words, int(rng.integers(3, 12)))) + "." for _ in range(400)]
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(lines) + "\n")
    body = corpus.read_text()
    from packkv.eval import spread_windows
    engine = Engine(str(folder), "cpu")
    got = spread_windows(engine, corpus, 3, 40)
    for i, ids in enumerate(got):
        at = len(body) * i // 3
        start = 0 if i == 0 else body.index("\n", at - 1) + 1
        assert start == 0 or body[start - 1] == "\n"
        assert ids == engine.tokenizer.encode(body[start:])[:40]
    assert got[0] == engine.tokenizer.encode(body)[:40] and got[1] != got[0]
    spread = eval_json(capsys, tmp_path, "kl", "--weights", folder, "--text", corpus, "--ctx", CTX, "--windows", 3,
                       "--prefill", PREFILL, "--spread", *FAST, "--cache", "packkv", "--kv-profile", "none")
    plain = eval_json(capsys, tmp_path, "kl", "--weights", folder, "--text", corpus, "--ctx", CTX, "--windows", 3,
                      "--prefill", PREFILL, *FAST, "--cache", "packkv", "--kv-profile", "none")
    assert spread["windows"]["spread"] and "spread" not in plain["windows"] and spread["kl"] != plain["kl"]
    code, captured = run(capsys, "kl", "--weights", folder, "--text", corpus, "--ctx", CTX, "--windows", 200,
                         "--prefill", PREFILL, "--spread", "--device", "cpu")
    assert code == 2 and "fewer than --ctx" in captured.err.strip().splitlines()[-1]


def test_sink_tokens_tuned_saved_and_read(tiny, capsys, tmp_path):
    """tune --kv-sink-tokens saves the count beside the sink bounds; kl with the profile uses it (and says
    so in its JSON), --kv-sink-tokens overrides it; fewer sink tokens than the block store fewer bytes."""
    folder, text = tiny
    grid = ["--rel-k", "0.1", "--rel-v", "0.2", "--granularities", "token-layer", "--budget-ppl", "100",
            "--kv-sink", "0.01,0.02"]
    profile = tmp_path / "sinktok.json"
    result = eval_json(capsys, tmp_path, "tune", *window_args(folder, text), *FAST, *grid, "--kv-sink-tokens", "4",
                       "--profile-out", profile)
    saved = json.loads(profile.read_text())
    assert saved["sink"] == [0.01, 0.02] and saved["sink_tokens"] == 4 and result["tried"][0]["sink_tokens"] == 4
    four = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), *FAST, "--cache", "packkv",
                     "--kv-profile", profile)
    whole = eval_json(capsys, tmp_path, "kl", *window_args(folder, text), *FAST, "--cache", "packkv",
                      "--kv-profile", profile, "--kv-sink-tokens", "16")
    assert four["sink_tokens"] == 4 and whole["sink_tokens"] == 16
    assert four["block_compression_ratio"] > whole["block_compression_ratio"]
