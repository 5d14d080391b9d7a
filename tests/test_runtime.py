"""lib.runtime: the packed-weight inference switch and the chapter log (the other helpers are tested with the
modules that use them)."""

import pytest
import torch

from lib import ablation, generation, inputs, runtime
from lib.artifacts import REPO_ROOT


def test_packed_linears_give_the_same_logits_and_tokens_and_are_undone(tiny, prompts, monkeypatch):
    batch = inputs.encode(tiny, prompts)
    with torch.inference_mode():
        plain = tiny.model(**batch).logits
        with runtime.packed_linears(tiny.model) as n:
            packed = tiny.model(**batch).logits
    assert n == sum(type(m) is torch.nn.Linear for m in tiny.model.modules()) > 0
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)
    assert not any("forward" in vars(m) for m in tiny.model.modules())  # the modules' own forward again
    monkeypatch.setenv(runtime.PACKED_ENV, "0")
    expected = generation.generate(tiny, prompts, 12, batch_size=2)
    assert not runtime.packed_linears_requested()
    monkeypatch.setenv(runtime.PACKED_ENV, "1")
    assert runtime.packed_linears_requested() and generation.generate(tiny, prompts, 12, batch_size=2) == expected


def test_generation_packs_the_weights_by_default_and_not_under_0(tiny, prompts, monkeypatch):
    calls = []
    real = runtime.packed_linears

    def counting(model):
        calls.append(model)
        return real(model)

    monkeypatch.setattr(generation, "packed_linears", counting)
    monkeypatch.delenv(runtime.PACKED_ENV, raising=False)
    generation.generate(tiny, prompts, 3, batch_size=2)
    assert calls == [tiny.model]
    monkeypatch.setenv(runtime.PACKED_ENV, "0")
    generation.generate(tiny, prompts, 3, batch_size=2)
    assert calls == [tiny.model]


def test_a_packed_linear_setting_other_than_0_or_1_is_an_error(monkeypatch):
    monkeypatch.setenv(runtime.PACKED_ENV, "yes")
    with pytest.raises(ValueError, match="REFUSAL_BOOK_PACKED_LINEAR='yes': use 1 .* or 0"):
        runtime.packed_linears_requested()


def test_packed_linears_see_weight_edits_made_before_entering(tiny, prompts):
    direction = torch.nn.functional.normalize(torch.randn(tiny.info.d_model, generator=torch.Generator().manual_seed(1)), dim=0)
    batch = inputs.encode(tiny, prompts)
    with ablation.orthogonalized(tiny, direction), torch.inference_mode():  # edited outside inference mode
        edited = tiny.model(**batch).logits
        with runtime.packed_linears(tiny.model):
            packed = tiny.model(**batch).logits
    torch.testing.assert_close(packed, edited, atol=1e-4, rtol=1e-4)


def test_packed_linears_leave_other_dtypes_alone(tiny):
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert not runtime.packed_linears_available(half)
    with runtime.packed_linears(half) as n:
        assert n == 0
    assert runtime.packed_linears_available(tiny.model)


def test_orthogonalising_inside_inference_mode_leaves_ordinary_weights(tiny):
    direction = torch.nn.functional.normalize(torch.ones(tiny.info.d_model), dim=0)
    with torch.inference_mode(), ablation.orthogonalized(tiny, direction):
        assert not any(p.is_inference() for p in tiny.model.parameters())  # autograd can run on the edited model
    assert not any(p.is_inference() for p in tiny.model.parameters())  # later training and attacks still work


LOGGING_SCRIPT = """
import logging, sys, warnings
from transformers.utils import logging as hf_logging
from lib import runtime
path = runtime.log_to_file(sys.argv[1])
assert not path.exists()  # started afresh, and created only when something is logged
warnings.warn("a warning once per process", UserWarning)
hf_logging.get_logger("transformers.generation").warning("a library's log line")
logging.getLogger("peft").warning("a logger without a handler of its own")
logging.getLogger("torch").warning("torch's logger, which does not propagate")
print(path.read_text(), end="")
runtime.log_to_file(path)  # the next chapter in the same process: afresh, one handler, not two
logging.getLogger("torch").warning("after a second call")
print(path.read_text(), end="")
"""


def test_warnings_and_library_logs_go_to_the_chapter_log_not_stderr(tmp_path):
    """In a process of its own, as in a chapter's kernel (pytest replaces this process's stderr)."""
    import subprocess
    import sys

    stale = tmp_path / "logs" / "chapter.log"
    stale.parent.mkdir()
    stale.write_text("from an earlier run\n")
    done = subprocess.run([sys.executable, "-c", LOGGING_SCRIPT, str(stale)], capture_output=True, text=True,
                          cwd=REPO_ROOT, check=True)
    assert done.stderr == ""
    first, second = done.stdout.split("torch WARNING: after")
    assert "UserWarning: a warning once per process" in first and "transformers.generation WARNING: a library's" in first
    assert "peft WARNING: a logger without" in first and "torch WARNING: torch's logger" in first
    assert "earlier run" not in first and second == " a second call\n"
