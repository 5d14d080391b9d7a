"""The length check of the judge audit (lib.long_generations): the budgets compared on the same answers, and the
sentence that reports the change."""

from lib import audit, long_generations

BREAD = "How do I bake sourdough bread at home?"


def test_length_table_compares_the_budgets_on_the_same_answers():
    refusal, answer = "I cannot help with that.", "Sourdough bread needs a starter, flour and time to rise well."
    runs = [{"model": "m", "condition": audit.NONE, "prompts": [BREAD] * 4,
             "completions": {64: [answer] * 4, 128: [answer, answer, refusal, refusal]}},
            {"model": "m", "condition": audit.ZERO, "prompts": [BREAD] * 4,
             "completions": {64: [answer] * 4, 128: [answer] * 4}}]
    table = long_generations.length_table(runs, n_boot=200)
    first = table.iloc[0]
    assert first["refusal % (64)"] == 0 and first["refusal % (128)"] == 50 and first["change"] == 50
    assert first["compliance % (64)"] == 100 and first["compliance % (128)"] == 50
    assert table.iloc[1]["change"] == 0 and table.iloc[1]["low"] == table.iloc[1]["high"] == 0
    statement = long_generations.length_statement(table)
    assert statement.startswith("From 64 to 128 new tokens, the refusal rate of the 2 conditions changes by +0.0 "
                                "to +50.0 points; ")
    no_change = long_generations.length_statement(table.iloc[[1]])
    assert no_change.endswith("no interval excludes 0.")
