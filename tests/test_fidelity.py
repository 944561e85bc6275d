"""The fidelity harness: drift of each mode from the full recompute of its own layout order."""

import pytest
import torch

from ragcache.fidelity import drift

QUESTION = "What is the capital of France?"




def test_drift_of_identical_logits_is_zero_and_of_others_positive():
    a = torch.randn(4, 50)
    same = drift(a, a.clone())
    assert same.kl_first == 0 and same.top1_first == 1 and same.kl_answer < 1e-6 and same.top1_answer == 1
    other = drift(a, torch.randn(4, 50))
    assert other.kl_first > 0 and other.kl_answer > 0


@pytest.mark.parametrize("mode", ["rag", "none"])
def test_the_baselines_do_not_drift(rc, mode):
    d = rc.fidelity(QUESTION, mode=mode, top_k=2, reference="Paris is the capital")
    assert d.kl_first < 1e-6 and d.kl_answer < 1e-6 and d.top1_first == d.top1_answer == 1


def test_caching_drifts_and_full_recompute_removes_it(rc):
    doc = rc.fidelity(QUESTION, mode="doc", top_k=3, reference="Paris")
    full = rc.fidelity(QUESTION, mode="doc", top_k=3, reference="Paris", recompute=1.0)
    assert doc.kl_first > 1e-6  # three chunks computed alone cannot equal one causal pass
    assert full.kl_first < 1e-6 and full.top1_first == 1


def test_the_first_token_agrees_with_ask(rc):
    answer = rc.ask(QUESTION, mode="doc", top_k=2, max_new_tokens=1, ignore_eos=True)
    rag = rc.ask(QUESTION, mode="rag", top_k=2, max_new_tokens=1, ignore_eos=True)
    d = rc.fidelity(QUESTION, mode="doc", top_k=2)
    assert d.top1_first == float(answer.token_ids == rag.token_ids)
