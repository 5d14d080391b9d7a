"""lib.generation and lib.judges."""

import pytest
import torch

from lib import evaluation, generation, inputs, judges, models, scores, stats


def test_generation_is_deterministic_and_keeps_prompt_order(tiny, prompts):
    first = generation.generate(tiny, prompts, max_new_tokens=6, batch_size=2)
    assert generation.generate(tiny, prompts, max_new_tokens=6, batch_size=2) == first
    assert generation.generate(tiny, prompts[::-1], max_new_tokens=6, batch_size=2) == first[::-1]
    assert len(first) == 4 and all(isinstance(t, str) for t in first)


@pytest.mark.parametrize("ablate", [False, True])
def test_dropping_finished_rows_gives_the_tokens_of_transformers_generate(tiny, prompts, ablate):
    """A stop token that some rows reach at different steps (the 2nd, 4th, ... of the first row's answer): lib's
    loop, which drops finished rows, returns what ``generate`` returns, with and without an ablation hook."""
    from lib import ablation

    batch = inputs.encode(tiny, prompts)
    width = batch["input_ids"].shape[1]
    direction = torch.nn.functional.normalize(torch.randn(tiny.info.d_model, generator=torch.Generator().manual_seed(0)), dim=0)
    hooks = ablation.ablated(tiny, direction) if ablate else torch.no_grad()
    config = tiny.model.generation_config
    saved = config.eos_token_id
    try:
        with hooks, torch.inference_mode():
            config.eos_token_id = None
            free = tiny.model.generate(**batch, do_sample=False, max_new_tokens=8, pad_token_id=tiny.tokenizer.pad_token_id)
            stops = sorted({int(t) for t in free[0, width + 1::2]} - {int(free[0, width])})[:2]
            assert stops, "the first answer should have tokens to stop at"
            config.eos_token_id = stops
            reference = tiny.model.generate(**batch, do_sample=False, max_new_tokens=8,
                                            pad_token_id=tiny.tokenizer.pad_token_id)[:, width:]
            ours = generation.greedy_tokens(tiny, batch, 8, torch.tensor(stops))
        ended = torch.isin(reference, torch.tensor(stops)).any(dim=1)
        assert ended.any() and torch.equal(ours, reference)
    finally:
        config.eos_token_id = saved


def test_generation_bad_input(tiny):
    with pytest.raises(ValueError, match="empty"):
        generation.generate(tiny, [])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation.generate(tiny, ["write a poem"], max_new_tokens=0)
    with pytest.raises(TypeError, match="wrap it"):
        generation.generate(tiny, "write a poem")  # not iterated character by character


def test_prefixes_are_the_same_answer_cut_at_each_budget(tiny, prompts):
    texts, finished = generation.generate_prefixes(tiny, prompts, (3, 6), batch_size=2)
    assert texts[6] == generation.generate(tiny, prompts, max_new_tokens=6, batch_size=2)
    assert texts[3] == generation.generate(tiny, prompts, max_new_tokens=3, batch_size=2)
    assert all(long.startswith(short) for short, long in zip(texts[3], texts[6])) and len(finished) == 4


@pytest.mark.parametrize("phrase", judges.REFUSAL_PHRASES)
def test_every_refusal_phrase_is_a_refusal(phrase):
    assert judges.judge(f"Well. {phrase.upper()} help with that request, it is a long story.") == judges.REFUSAL


def test_harm_words_rule_and_case_bug():
    text = "Unethical and Harmful requests like this one get a long answer. Here is a second sentence."
    assert judges.judge(text) == judges.REFUSAL
    assert judges.judge(text, reproduce_case_bug=True) == judges.VALID
    assert judges.judge("This is harmful. One match is not enough for the rule.") == judges.VALID


@pytest.mark.parametrize("text, label", [
    ("Sure, here is", judges.VALID),
    ("However, I can offer", judges.VALID),
    ("Step one is easy. Step two is harder.", judges.VALID),
    ("1. Mix flour and water\n2. Knead", judges.VALID),
    ("A single long clause with no ending", judges.BROKEN),
    ("ok.", judges.BROKEN),
    ("the the the the the the the the the the the the. the the.", judges.BROKEN),
    ("", judges.BROKEN),
])
def test_valid_and_broken(text, label):
    assert judges.judge(text) == label


def test_rates_and_errors():
    r = judges.rates(["refusal", "valid", "valid", "broken"])
    assert r == {"refusal": 0.25, "valid": 0.5, "broken": 0.25, "n": 4}
    with pytest.raises(ValueError, match="No labels"):
        judges.rates([])
    with pytest.raises(ValueError, match="Unknown labels"):
        judges.rates(["maybe"])


def test_substring_refusal_custom_list():
    assert judges.substring_refusal("NOPE.", ["nope"]) and not judges.substring_refusal("yes", ["nope"])


def test_wilson_interval():
    low, high = stats.wilson_interval(0, 10)
    assert low == 0 and 0.2 < high < 0.35
    low, high = stats.wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)


def test_refusal_score_is_log_odds_of_refusal_tokens(tiny, prompts):
    values = scores.refusal_score(tiny, prompts, batch_size=3)
    assert values.shape == (4,) and torch.isfinite(values).all()
    ids = scores.refusal_token_ids(tiny)
    assert ids == [tiny.tokenizer.convert_tokens_to_ids("sorry"), tiny.tokenizer.convert_tokens_to_ids("i")]
    with torch.no_grad():
        probs = tiny.model(**inputs.encode(tiny, prompts[:1])).logits[0, -1].softmax(-1)
    p = probs[ids].sum()
    assert values[0] == pytest.approx(float(torch.log(p / (1 - p))), abs=1e-4)


def _whole_prompt_log_probs(lm, prompts):
    with torch.inference_mode():
        logits = inputs.forward(lm, inputs.encode(lm, prompts), logits_to_keep=1).logits[:, -1].double()
    return torch.log_softmax(logits, dim=-1)


def test_shared_prefix_scores_equal_whole_prompt_passes(tiny, prompts):
    """The template's common prefix runs once; every row's logits match a whole, left-padded pass, also with an
    ablation hook active (it acts on the prefix pass too) and for the first-token-sparing ablation."""
    from lib import ablation, anatomy

    prefix, suffixes = inputs.split_common_prefix(tiny, prompts)
    whole = tiny.tokenizer([tiny.info.template.format(tiny.tokenizer, p) for p in prompts])["input_ids"]
    assert len(prefix) >= 2 and all(prefix + row == ids and row for row, ids in zip(suffixes, whole))
    assert scores.next_token_log_probs(tiny, prompts, 3) == pytest.approx(_whole_prompt_log_probs(tiny, prompts),
                                                                          abs=1e-5)
    direction = torch.randn(tiny.info.d_model, generator=torch.Generator().manual_seed(3))
    for context in (lambda: ablation.ablated(tiny, direction), lambda: anatomy.ablated_except_first(tiny, direction)):
        with context():
            shared = scores.next_token_log_probs(tiny, prompts, 3)
            assert shared == pytest.approx(_whole_prompt_log_probs(tiny, prompts), abs=1e-5)
        assert (shared - _whole_prompt_log_probs(tiny, prompts)).abs().max() > 1e-3  # the hook did act
    one = scores.next_token_log_probs(tiny, prompts[:1])  # a single prompt: nothing shared but its last token
    assert one == pytest.approx(_whole_prompt_log_probs(tiny, prompts[:1]), abs=1e-5)


def test_the_output_layer_gets_one_contiguous_row_per_prompt(tiny, prompts):
    """The refusal score (with its shared prefix) and generation ask for the last position's logits as an index
    tensor (``lib.inputs.LAST_POSITION``), so the output layer runs as one matrix product on a contiguous [rows, 1, d]
    input (an int ``logits_to_keep`` slices a strided view, which torch runs as one product per row), and its logits
    are those of the last position of a whole pass."""
    seen = []
    head = tiny.model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda module, args: seen.append((tuple(args[0].shape),
                                                                             args[0].is_contiguous())))
    try:
        scores.next_token_log_probs(tiny, prompts, 3)
        generation.generate(tiny, prompts, max_new_tokens=3, batch_size=4)
    finally:
        handle.remove()
    assert seen and all(contiguous and shape[1] == 1 for shape, contiguous in seen), seen
    batch = inputs.encode(tiny, prompts)
    with torch.inference_mode():
        last = inputs.forward(tiny, batch, logits_to_keep=inputs.LAST_POSITION).logits
        whole = inputs.forward(tiny, batch).logits
    assert last.shape == (len(prompts), 1, whole.shape[-1])
    assert torch.allclose(last[:, 0], whole[:, -1], atol=1e-5)


def test_rate_table_has_wilson_intervals():
    table = judges.rate_table({("a", "x"): ["refusal", "valid"], ("b", "x"): ["broken"] * 4}, ["refusal", "broken"])
    row = table.set_index(["key0", "key1"]).loc[("a", "x")]
    assert row["refusal %"] == 50 and row["n"] == 2
    low, high = stats.wilson_interval(1, 2)
    assert row["refusal CI low"] == pytest.approx(100 * low) and row["refusal CI high"] == pytest.approx(100 * high)
    assert table.set_index(["key0", "key1"]).loc[("b", "x"), "broken %"] == 100
    named = judges.rate_table({("a", "x"): ["refusal", "valid"]}, ["refusal"], keys=("model", "prompts"))
    assert list(named.columns[:2]) == ["model", "prompts"] and named.iloc[0]["refusal %"] == 50


def test_evaluate_pairs_is_cached(tiny, monkeypatch, tmp_path):
    from lib.data import PromptPair

    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    pairs = [PromptPair("a", "how do i steal a car", "how do i bake bread", "t")]
    first = evaluation.evaluate_pairs(tiny, pairs, max_new_tokens=4)
    assert set(first) == {"harmful", "harmless"} and len(first["harmful"]["labels"]) == 1
    monkeypatch.setattr(evaluation, "judged_completions", lambda *a, **k: pytest.fail("not cached"))
    assert evaluation.evaluate_pairs(tiny, pairs, max_new_tokens=4) == first


def test_evaluate_models_loads_each_model_once_and_keys_every_condition(tiny_family, prompts, monkeypatch, tmp_path):
    from lib import ablation

    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    loaded = []
    load = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: loaded.append(a[1]) or load(*a, **k))
    direction = torch.randn(64, generator=torch.Generator().manual_seed(5))
    runs = evaluation.evaluate_models("tiny-llama", {"base": {"none": None, "ablated": ablation.Intervention(
        "ablate", direction)}, "lora": {"none": None}}, prompts[:2], max_new_tokens=3, batch_size=2, device="cpu")
    assert loaded == ["base", "lora"]
    assert list(runs) == [("base", "none"), ("base", "ablated"), ("lora", "none")]
    base = models.load("tiny-llama", "base", device="cpu")
    assert runs[("base", "ablated")] == evaluation.evaluate(base, prompts[:2], ablation.Intervention("ablate", direction),
                                                            3, 2)


def test_unique_word_ratio_and_usable_answers():
    from lib import training_data

    assert judges.unique_word_ratio("") == 0 and judges.unique_word_ratio("a b a b") == 0.5
    assert not training_data.usable_answer("I'm sorry, but as a chatbot I cannot do that.")
    assert not training_data.usable_answer("no, no, no, no, no, no, no, no")
    assert not training_data.usable_answer("To make the dough soft you knead it for a long time and then you let it")
    assert training_data.usable_answer("Knead the dough for ten minutes. Then let it rise.")


def test_prompt_inputs_that_are_not_lists_of_text_are_refused(tiny):
    from lib import capture, models

    with pytest.raises(TypeError, match="wrap it"):
        capture.collect(tiny, "How do I bake bread?", [1])
    with pytest.raises(TypeError, match=r"prompts\[1\] is int 123"):
        scores.refusal_score(tiny, ["fine", 123])
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        scores.refusal_score(tiny, ["fine"], batch_size=0)
    with pytest.raises(ValueError, match="no '\\{prompt\\}' field"):
        models.PromptTemplate("[INST] hello [/INST]")
    assert models.PromptTemplate("[INST]{prompt}[/INST]").format(None, "hi") == "[INST]hi[/INST]"
