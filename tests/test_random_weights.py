"""Random-weight models of real shapes: the presets have the real parameter counts; a config.json works;
the CLI decodes token ids without a tokenizer."""
import json

import numpy as np
import pytest

from packkv.errors import PackkvError
from packkv.generate import main
from packkv.weights import expected_tensors
from packkv.weights.random import RandomTensors, random_config


@pytest.mark.parametrize("name, billions", [("llama-3.1-8b", 8.03), ("llama-2-7b", 6.74), ("tinyllama-1.1b", 1.10),
                                           ("smollm2-135m", 0.135)])
def test_presets_have_the_real_parameter_counts(name, billions):
    params = sum(int(np.prod(s)) for s in expected_tensors(random_config(name)).values())
    assert params / 1e9 == pytest.approx(billions, abs=0.01)


def test_llama31_preset_scales_rope():
    config = random_config("llama-3.1-8b")
    assert config.rope_scaling["rope_type"] == "llama3" and config.num_key_value_heads == 8
    assert config.head_dim == 128 and config.max_position_embeddings == 131072


def test_random_tensors_are_seeded_and_shaped(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"model_type": "llama", "vocab_size": 50, "hidden_size": 32,
                                       "intermediate_size": 40, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "num_key_value_heads": 2}))
    config = random_config(str(config_path))
    a, b = RandomTensors(config, np, np.float32, seed=3), RandomTensors(config, np, np.float32, seed=3)
    name = "model.layers.0.self_attn.k_proj.weight"
    first, second = a[name], b[name]
    assert first.shape == (16, 32) and np.array_equal(first, second) and 0.01 < first.std() < 0.03
    assert (a["model.norm.weight"] == 1).all() and "lm_head.weight" in a


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(PackkvError, match="llama-3.1-8b"):
        random_config("llama-9")


def test_cli_decodes_random_weights(tmp_path, capsys):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"model_type": "llama", "vocab_size": 50, "hidden_size": 32,
                                       "intermediate_size": 40, "num_hidden_layers": 2,
                                       "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "max_position_embeddings": 64}))
    assert main(["--random-weights", str(config_path), "--device", "cpu", "--max-tokens", "4",
                 "--prompt-tokens", "6", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("token ids: ") and len(out.split()) == 2 + 4


def test_a_cache_longer_than_the_context_is_refused(tmp_path):
    """Positions past the context have no RoPE angles: a cache that could hold them is refused."""
    from packkv.generate import Engine
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"model_type": "llama", "vocab_size": 50, "hidden_size": 32,
                                       "intermediate_size": 40, "num_hidden_layers": 1,
                                       "num_attention_heads": 4, "num_key_value_heads": 2,
                                       "max_position_embeddings": 64}))
    engine = Engine(None, device="cpu", max_context=48, random_weights=str(config_path))
    assert engine.new_cache("dense", batch=1, tokens=48).shape.max_context == 48
    with pytest.raises(PackkvError, match="cache of 49 tokens is longer than the context of 48"):
        engine.new_cache("packkv", batch=1, tokens=49)
