"""`python -m packkv.eval`: sizes that add up, on made-up and on real KV."""
import json

import numpy as np
import pytest

from packkv import codec
from packkv.eval import as_blocks, kivi_bits_per_element, main, measure_compression


def test_as_blocks_keeps_layer_major_whole_blocks():
    x = np.arange(2 * 3 * 70 * 4).reshape(2, 3, 70, 4)
    blocks = as_blocks(x, 32)
    assert blocks.shape == (4, 3, 32, 4)
    np.testing.assert_array_equal(blocks[3], x[1, :, 32:64])


def test_measured_sizes_add_up():
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((2, 3, 128, 16)) * 3).astype(np.float16)
    v = rng.standard_normal((2, 3, 128, 16)).astype(np.float16)
    params = codec.CodecParams(block=64)
    result = measure_compression(k, v, params)
    buffer, offsets, _ = codec.encode_blocks(as_blocks(k, 64), as_blocks(v, 64), params)
    assert result["kv_bytes"] == buffer.size + 8 * 4 == sum(result["bytes"].values())
    assert result["fp16_bytes"] == k.size * 2 * 2
    assert result["compression_ratio"] == pytest.approx(result["fp16_bytes"] / result["kv_bytes"])
    bits = result["bits_per_element"]
    assert (bits["k"] + bits["v"]) / 2 == pytest.approx(16 / result["compression_ratio"])
    assert 0 < result["entropy_bits"]["v"] < bits["v"]


def test_kivi_size_counts_scale_and_zero():
    assert kivi_bits_per_element(2, 32) == 3.0 and kivi_bits_per_element(4, 64) == 4.5


@pytest.mark.slow
def test_compression_command_on_real_kv(tmp_path, smollm2_folder, capsys):
    text = tmp_path / "text.txt"
    text.write_text("It was the best of times, it was the worst of times, it was the age of wisdom. " * 40)
    out = tmp_path / "c.json"
    assert main(["compression", "--weights", str(smollm2_folder), "--text", str(text), "--tokens", "128",
                 "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tokens"] == 128 and result["params"]["rel_k"] == 0.1
    assert 3 < result["compression_ratio"] < 20
    assert "x vs fp16" in capsys.readouterr().out


def test_compression_command_refuses_a_missing_text(tmp_path, capsys):
    assert main(["compression", "--text", str(tmp_path / "none.txt"), "--device", "cpu"]) == 2
    assert "not found" in capsys.readouterr().err
