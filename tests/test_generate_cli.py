"""`python -m packkv.generate`: every bad input gives one clear line and exit code 2; sampling and
streaming behave."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from packkv.backend import gpu_problem
from packkv.errors import PackkvError
from packkv.generate import SamplingParams, Sampler, main
from packkv.model import LlamaConfig
from packkv.weights import Tokenizer, expected_tensors

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64}


def write_checkpoint(folder, config=TINY, drop=None, reshape=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    shapes = expected_tensors(LlamaConfig.from_hf(TINY))
    if reshape:
        shapes[reshape] = (shapes[reshape][0] + 1,) + shapes[reshape][1:]
    save_file({name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()
               if name != drop}, str(folder / "model.safetensors"))
    return folder


def run_cli(capsys, *args):
    code = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_error(capsys, args, *words):
    code, err = run_cli(capsys, *args)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], (word, err[0])


def test_missing_folder(capsys, tmp_path):
    assert_error(capsys, ["--weights", str(tmp_path / "nope"), "--device", "cpu"], "not found", "nope")


def test_file_instead_of_folder(capsys, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    assert_error(capsys, ["--weights", str(f), "--device", "cpu"], "must be a folder")


def test_missing_config(capsys, tmp_path):
    tmp_path.joinpath("w").mkdir()
    assert_error(capsys, ["--weights", str(tmp_path / "w"), "--device", "cpu"], "missing file", "config.json")


def test_unsupported_architecture(capsys, tmp_path):
    folder = write_checkpoint(tmp_path / "w", {**TINY, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    assert_error(capsys, ["--weights", str(folder), "--device", "cpu"], "unsupported architecture", "GPT2LMHeadModel")


def test_unsupported_rope_scaling(capsys, tmp_path):
    folder = write_checkpoint(tmp_path / "w", {**TINY, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    assert_error(capsys, ["--weights", str(folder), "--device", "cpu"], "rope_scaling", "yarn")


def test_missing_tensor(capsys, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    folder = write_checkpoint(tmp_path / "w", drop=name)
    assert_error(capsys, ["--weights", str(folder), "--device", "cpu"], name, "missing")


def test_tensor_of_wrong_shape(capsys, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    folder = write_checkpoint(tmp_path / "w", reshape=name)
    assert_error(capsys, ["--weights", str(folder), "--device", "cpu"], name, "(17, 32)", "(16, 32)")


def test_no_safetensors(capsys, tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY))
    assert_error(capsys, ["--weights", str(folder), "--device", "cpu"], "no model.safetensors")


def test_missing_tokenizer(capsys, tmp_path):
    folder = write_checkpoint(tmp_path / "w")
    assert_error(capsys, ["--weights", str(folder), "--device", "cpu"], "missing file", "tokenizer.json")


def test_missing_prompt_file(capsys, tmp_path):
    assert_error(capsys, ["--prompt-file", str(tmp_path / "prompt.txt"), "--device", "cpu"], "--prompt-file")


@pytest.mark.parametrize("flags, words", [
    (["--temp", "-1"], ["--temp", "-1"]),
    (["--temp", "nan"], ["--temp"]),
    (["--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--top-p", "1.5"], ["--top-p"]),
    (["--top-k", "-1"], ["--top-k"]),
])
def test_invalid_sampling_values(capsys, flags, words):
    assert_error(capsys, flags + ["--device", "cpu"], *words)


@pytest.mark.skipif(gpu_problem() is None, reason="a GPU is usable here")
def test_gpu_asked_without_gpu(capsys):
    assert_error(capsys, ["--device", "gpu"], "--device gpu")


@pytest.mark.slow
def test_prompt_longer_than_context(capsys, smollm2_folder):
    assert_error(capsys, ["--weights", str(smollm2_folder), "--device", "cpu", "--max-context", "8",
                          "--prompt", "one two three four five six seven eight nine ten"], "prompt has", "context of 8")


@pytest.mark.slow
def test_max_context_beyond_model(capsys, smollm2_folder):
    assert_error(capsys, ["--weights", str(smollm2_folder), "--device", "cpu", "--max-context", "100000"],
                 "--max-context", "8192")


@pytest.mark.slow
def test_cli_generates_and_writes_json(capsys, smollm2_folder, tmp_path):
    out = tmp_path / "out.json"
    code = main(["--weights", str(smollm2_folder), "--device", "cpu", "--max-tokens", "6", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0
    record = json.loads(out.read_text())
    assert "Paris" in captured.out and "Paris" in record["text"]
    assert len(record["token_ids"]) == record["stats"]["generated_tokens"] == 6
    stats = record["stats"]
    assert stats["prompt_tokens"] == len(record["prompt_ids"]) and stats["decode_tok_s"] > 0
    # 5 prompt tokens + 5 decoded (the 6th is sampled, never fed back): 30 layers x 3 heads x 64 x K,V x fp32
    assert stats["kv_bytes_used"] == 10 * 30 * 3 * 64 * 2 * 4
    assert stats["kv_bytes_reserved"] >= stats["kv_bytes_used"]
    assert "decode" in captured.err and "KV cache (dense)" in captured.err


# ---- sampling ---------------------------------------------------------------------------------------

def sample_many(cpu, logits, n=4000, **params):
    sampler = Sampler(SamplingParams(**params, seed=123), cpu)
    return np.bincount([sampler(logits) for _ in range(n)], minlength=logits.size)


def test_greedy_and_degenerate_sampling_pick_the_argmax(cpu):
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(), cpu)(logits) == 1
    assert set(np.flatnonzero(sample_many(cpu, logits, 200, temperature=1.0, top_k=1))) == {1}
    assert set(np.flatnonzero(sample_many(cpu, logits, 200, temperature=1.0, top_p=0.01))) == {1}


def test_temperature_sampling_follows_softmax(cpu):
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    counts = sample_many(cpu, logits, temperature=1.0)
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.03)


def test_top_k_and_top_p_cut_the_tail(cpu):
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    assert sample_many(cpu, logits, temperature=1.0, top_k=2)[2:].sum() == 0
    counts = sample_many(cpu, logits, temperature=1.0, top_p=0.65)   # 0.4 + 0.3 reach 0.65
    assert counts[2:].sum() == 0
    np.testing.assert_allclose(counts[:2] / counts.sum(), [4 / 7, 3 / 7], atol=0.03)


def test_seed_makes_sampling_repeatable(cpu):
    logits = np.random.default_rng(0).standard_normal(50).astype(np.float32)
    def draws(seed):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), cpu)
        return [sampler(logits) for _ in range(50)]

    assert draws(7) == draws(7) != draws(8)


def test_sampling_params_are_validated():
    with pytest.raises(PackkvError):
        SamplingParams(temperature=-0.5)


# ---- streaming --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_stream_decoder_emits_whole_utf8_characters(smollm2_folder):
    tokenizer = Tokenizer(smollm2_folder)
    text = "Grüße aus Köln: 日本語のテキスト 🙂🚀 and 12345 digits, naïve café."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())          # multi-byte characters span several tokens
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("flags, words", [
    (["--cache", "packkv", "--kv-rel-k", "0"], ["rel_k"]),
    (["--cache", "packkv", "--kv-block", "24"], ["block"]),
    (["--cache", "packkv", "--kv-window", "-1"], ["--kv-window"]),
])
def test_invalid_kv_parameters(capsys, flags, words):
    assert_error(capsys, flags + ["--device", "cpu"], *words)


@pytest.mark.slow
def test_cli_generates_with_the_packkv_cache(capsys, smollm2_folder, tmp_path):
    out = tmp_path / "out.json"
    prompt = "The capital of France is Paris. The capital of Italy is Rome. " * 12
    code = main(["--weights", str(smollm2_folder), "--device", "cpu", "--max-tokens", "8", "--cache", "packkv",
                 "--kv-window", "16", "--prompt", prompt, "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    stats = json.loads(out.read_text())["stats"]
    assert stats["cache"] == "packkv" and stats["compression_ratio"] > 2.5
    assert stats["kv_params"]["rel_k"] == 0.1 and stats["kv_params"]["window"] == 16
    assert "x vs fp16" in captured.err and "bits/element" in captured.err
