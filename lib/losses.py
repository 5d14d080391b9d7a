"""Losses on a loaded model, shared by LoRA training and the adversary: the language-modelling loss over the
labelled (response) tokens, the same loss with the output layer run on those positions only, per-example response
log-probabilities, and ORPO's odds-ratio term."""

from __future__ import annotations

import torch

from lib.inputs import forward, position_ids
from lib.models import LoadedModel


IGNORE = -100  # the label of positions no loss is taken on (the prompt and padding)


def lm_loss(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over the labelled (response) tokens."""
    return forward(lm, batch).loss


def response_logprob_sums(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probabilities, count) of each row's labelled (response) tokens. The output layer runs on the
    labelled positions only: at this vocabulary size most of a batch's logits are never needed."""
    model = lm.model
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 position_ids=position_ids(batch["attention_mask"]), use_cache=False)[0]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
    token_logp = logits.log_softmax(-1).gather(1, targets[mask].unsqueeze(1)).squeeze(1)
    sums = torch.zeros(len(targets), dtype=token_logp.dtype, device=token_logp.device)
    return sums.index_add(0, mask.nonzero()[:, 0], token_logp), mask.sum(1)


def response_loss(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``lm_loss`` (mean next-token loss over the labelled tokens) with the output layer run on the labelled
    positions only, so that a PGD step does not compute vocabulary-wide logits at every prompt position; equal up to
    float rounding."""
    sums, counts = response_logprob_sums(lm, batch)
    return -sums.sum() / counts.sum().clamp_min(1)


def response_logprobs(lm: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean log-probability per token of each row's response: log of the geometric-mean token probability,
    ORPO's sequence likelihood."""
    sums, counts = response_logprob_sums(lm, batch)
    return sums / counts.clamp_min(1)


def odds_ratio_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor) -> torch.Tensor:
    """ORPO's term, -log sigmoid(log odds(chosen) - log odds(rejected)), averaged over pairs."""
    def log_odds(logp):
        return logp - torch.log1p(-torch.exp(logp).clamp(max=1 - 1e-6))

    return -torch.nn.functional.logsigmoid(log_odds(chosen_logp) - log_odds(rejected_logp)).mean()

