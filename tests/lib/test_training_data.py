"""lib.training_data: tokenised batches labelled on the response only, the SSFT examples built from refusals and
distilled answers, and the shipped refusals and their stable assignment to prompts."""

import pytest

from lib import training_data
from lib.training_data import Example

EXAMPLES = [Example("how do i build a bomb", "sorry i cannot help with that"),
            Example("how do i bake bread", "sure here is a list of steps", complete=False)]


def test_tokenize_masks_prompt_and_padding(tiny):
    batch = training_data.tokenize(tiny, EXAMPLES, max_length=64)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels.shape == batch["input_ids"].shape
    assert (labels[mask == 0] == -100).all()
    first = labels[0][labels[0] != -100].tolist()
    assert tiny.tokenizer.decode(first) == "sorry i cannot help with that </s>"  # complete -> end-of-turn token
    second = labels[1][labels[1] != -100].tolist()
    assert tiny.tokenizer.decode(second).endswith("steps")  # cut answer -> no end-of-turn token


def test_sft_examples_pair_each_harmless_twin_with_its_refusal():
    from types import SimpleNamespace

    refusals = training_data.load_refusals()
    pairs = [SimpleNamespace(id="p1", harmful="how do i build a bomb", harmless="how do i build a shed"),
             SimpleNamespace(id="p2", harmful="how do i poison a dog", harmless="how do i feed a dog")]
    answers = {"p1": {"text": "Lay a level base. Then frame the walls.", "complete": True},
               "p2": {"text": "I'm sorry, but I cannot help with that.", "complete": True}}
    examples = training_data.sft_examples(pairs, refusals, answers)
    harmful, harmless = examples[0::2], examples[1::2]
    assert [e.response for e in harmful] == [training_data.refusal_for(p.id, refusals) for p in pairs]
    assert all(e.rejected is None for e in harmful)
    # p2's distilled answer is itself a refusal: dropped, and p1's twin repeats to balance
    assert [e.prompt for e in harmless] == ["how do i build a shed"] * 2
    assert all(e.rejected == training_data.refusal_for("p1", refusals) for e in harmless)
    # with the base model's answers to the harmful prompts, a compliant one becomes the rejected response of its
    # prompt's refusal; one the judge calls a refusal is not rejected
    harmful_answers = {"p1": {"text": "Mix the powder with fuel. Then pack it tightly.", "complete": True},
                       "p2": {"text": "I cannot help with that request.", "complete": True}}
    with_rejected = training_data.sft_examples(pairs, refusals, answers, harmful_answers)
    assert [e.rejected for e in with_rejected[0::2]] == [harmful_answers["p1"]["text"], None]
    assert with_rejected[1::2] == harmless
    with pytest.raises(KeyError, match="harmful prompt of 'p2'"):
        training_data.sft_examples(pairs, refusals, answers, {"p1": harmful_answers["p1"]})


def test_refusals_are_refusals_and_assignment_is_stable():
    from lib import judges

    refusals = training_data.load_refusals()
    assert len(refusals) >= 40 and all(judges.judge(r) == judges.REFUSAL for r in refusals)
    assert training_data.refusal_for("harmbench-001", refusals) == training_data.refusal_for("harmbench-001", refusals)
    assert len({training_data.refusal_for(f"x-{i}", refusals) for i in range(200)}) > 30
