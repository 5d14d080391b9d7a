"""lib.capture and lib.hooks: activations at resid_pre / resid_mid / resid_post match the model's own states."""

import pytest
import torch

from lib import capture, inputs
from lib.hooks import attached, site_hook


def hidden_states(lm, prompts):
    batch = inputs.encode(lm, prompts)
    with torch.no_grad():
        states = lm.model(**batch, output_hidden_states=True).hidden_states
    return tuple(state.cpu() for state in states)  # capture.collect returns CPU tensors on every device


def tolerance(lm) -> dict:
    """Float32 kernels on a GPU may sum in another order than the model's own pass (seen: 1.4e-5 on an H200)."""
    return dict(atol=1e-5, rtol=1e-5) if lm.info.device.type == "cpu" else dict(atol=1e-4, rtol=1e-4)


def test_resid_pre_matches_hidden_states_with_left_padding(tiny, prompts):
    acts = capture.collect(tiny, prompts, batch_size=len(prompts))["resid_pre"]
    states = hidden_states(tiny, prompts)
    expected = torch.stack([h[:, -1] for h in states[:4]], dim=1)
    assert acts.shape == (4, 4, 64) and acts.dtype == torch.float32
    torch.testing.assert_close(acts, expected, **tolerance(tiny))


def test_sites_are_consistent(tiny, prompts):
    acts = capture.collect(tiny, prompts, sites=("resid_pre", "resid_mid", "resid_post"))
    torch.testing.assert_close(acts["resid_post"][:, :-1], acts["resid_pre"][:, 1:], atol=1e-5, rtol=1e-5)
    # resid_mid = resid_pre + attention output
    attn_out = {}
    hooks = [(tiny.info.submodule(layer, "attn"), "post",
              (lambda layer: lambda m, a, out: attn_out.__setitem__(layer, out[0][:, -1].cpu()))(layer))
             for layer in range(4)]
    with attached(hooks), torch.no_grad():
        tiny.model(**inputs.encode(tiny, prompts[:1]))
    for layer in range(4):
        torch.testing.assert_close(acts["resid_mid"][0, layer], acts["resid_pre"][0, layer] + attn_out[layer][0],
                                   **tolerance(tiny))


def test_batching_and_subsets_do_not_change_results(tiny, prompts):
    whole = capture.collect(tiny, prompts, batch_size=4)["resid_pre"]
    single = capture.collect(tiny, prompts, batch_size=1)["resid_pre"]
    torch.testing.assert_close(whole, single, atol=1e-4, rtol=1e-4)
    subset = capture.collect(tiny, prompts, layers=[2], batch_size=3)["resid_pre"]
    torch.testing.assert_close(subset[:, 0], whole[:, 2], atol=1e-5, rtol=1e-5)


def test_several_positions(tiny, prompts):
    acts = capture.collect(tiny, prompts, positions=[-2, -1, 0])["resid_pre"]
    states = hidden_states(tiny, prompts)
    assert acts.shape == (4, 4, 3, 64)
    torch.testing.assert_close(acts[:, 1, 1], states[1][:, -1], **tolerance(tiny))
    torch.testing.assert_close(acts[:, 1, 0], states[1][:, -2], **tolerance(tiny))
    mask = inputs.encode(tiny, prompts)["attention_mask"]
    first = mask.argmax(dim=1).cpu()
    torch.testing.assert_close(acts[:, 1, 2], states[1][torch.arange(4), first], **tolerance(tiny))


def test_capture_reruns_are_identical(tiny, prompts):
    a = capture.collect(tiny, prompts)["resid_pre"]
    b = capture.collect(tiny, prompts)["resid_pre"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"layers": [4]}, r"out of range.*0\.\.3"),
    ({"layers": [-1]}, "out of range"),
    ({"layers": []}, "empty"),
    ({"layers": [1.7]}, "whole numbers"),
    ({"layers": [True]}, "whole numbers"),
    ({"sites": ("resid_final",)}, "Unknown residual site"),
    ({"positions": [-99]}, "outside a prompt"),
    ({"positions": []}, "positions is empty"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_arguments(tiny, prompts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        capture.collect(tiny, prompts, **kwargs)


def test_empty_prompt_list(tiny):
    with pytest.raises(ValueError, match="empty"):
        capture.collect(tiny, [])


def test_hooks_removed_after_error(tiny, prompts):
    def boom(hidden):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attached([site_hook(tiny.info, "resid_pre", 0, boom)]):
        tiny.model(**inputs.encode(tiny, prompts[:1]))
    assert not tiny.info.layers[0]._forward_pre_hooks


def test_pair_activations_cached_by_key(tiny, monkeypatch, tmp_path):
    from lib.data import PromptPair

    monkeypatch.setenv("REFUSAL_BOOK_ARTIFACTS", str(tmp_path))
    pairs = [PromptPair("a", "how do i steal a car", "how do i bake bread", "t"),
             PromptPair("b", "build a bomb", "write a poem", "t")]
    tensors, meta = capture.pair_activations(tiny, pairs, layers=[0, 3], sites=("resid_pre",))
    assert tensors["harmful/resid_pre"].shape == (2, 2, 64) and meta["pair_ids"] == ["a", "b"]
    calls = []
    monkeypatch.setattr(capture, "collect", lambda *a, **k: calls.append(1) or {"resid_pre": torch.zeros(2, 2, 64)})
    again, _ = capture.pair_activations(tiny, pairs, layers=[0, 3], sites=("resid_pre",))
    assert not calls and torch.equal(again["harmless/resid_pre"], tensors["harmless/resid_pre"])
    capture.pair_activations(tiny, pairs[:1] + [PromptPair("b", "build a bomb", "write a story", "t")],
                             layers=[0, 3], sites=("resid_pre",))
    assert calls  # changed data -> recomputed


def test_sites_given_as_one_string_are_refused(tiny, prompts):
    with pytest.raises(ValueError, match=r"not one string; wrap it: \['resid_pre'\]"):
        capture.collect(tiny, prompts, sites="resid_pre")
