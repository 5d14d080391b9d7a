"""lib.inputs: prompts in the family's template, left-padded batches, and the warning for prompts that fill the
context."""

import pytest

from lib import inputs


def test_paper_template_adds_bos_and_left_pads(tiny):
    batch = inputs.encode(tiny, ["write a poem", "how do i bake bread please"])
    ids = batch["input_ids"]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][1, 0] == 1  # left padding
    assert tiny.tokenizer.decode(ids[1]).startswith("<s> [INST] how do i bake bread please [/INST]")
    assert tiny.info.template.format(tiny.tokenizer, "x") == "\n[INST]x[/INST]\n"


def test_encode_rejects_empty_list(tiny):
    with pytest.raises(ValueError, match="empty"):
        inputs.encode(tiny, [])


def test_a_prompt_filling_the_context_is_warned_about(tiny):
    from lib import capture, scores

    long = "bread " * 200  # the tiny model's context is 128 tokens
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) \(first: index 1, .*context of 128 tokens"):
        inputs.encode(tiny, ["short", long])
    with pytest.warns(UserWarning, match="context of 128"):
        capture.collect(tiny, ["short", long], layers=[0])
    with pytest.warns(UserWarning, match="context of 128"):
        scores.refusal_score(tiny, ["short", long])
