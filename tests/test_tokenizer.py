import numpy as np
import pytest

from auraflow_edge.engine.runtime.tokenizer import TextTokenizer

PROMPTS = ["", "a photo of a cat", "Cyberpunk CITY, neon!! 123 ünïcödé", "word " * 400]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers(tiny_dir, prompt):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    r = ref(prompt, truncation=True, max_length=256, padding="max_length", return_tensors="np")
    ids, mask = TextTokenizer(tiny_dir / "tokenizer")(prompt)
    np.testing.assert_array_equal(ids, r["input_ids"])
    np.testing.assert_array_equal(mask, r["attention_mask"])
    assert ids.shape == (1, 256)
    assert ids[0, -1] == 2  # EOS kept (left padding, LlamaTokenizer's default), even when truncated
    n = int(mask.sum())
    assert (ids[0, : 256 - n] == ref.pad_token_id).all()
