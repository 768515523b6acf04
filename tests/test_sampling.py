"""The one next-token sampler (openk2.model.sampling) that generate, the engine and constrained decoding share."""

import math

import torch

from openk2.model.sampling import sample_next, sampling_probs, top_p_filter


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    # sorted: 0.4, 0.3, 0.15, 0.1, 0.05 -> cumulative 0.4, 0.7, 0.85, 0.95, 1.0
    kept = lambda p: set(torch.nonzero(top_p_filter(probs, p)).flatten().tolist())  # noqa: E731
    assert kept(0.4) == {1}            # 0.4 alone reaches 0.4
    assert kept(0.41) == {1, 3}        # needs the second token
    assert kept(0.7) == {1, 3}
    assert kept(0.71) == {1, 3, 4}
    assert kept(0.9) == {1, 3, 4, 0}
    assert kept(1e-6) == {1}           # never empty
    assert kept(1.0) == {0, 1, 2, 3, 4}
    out = top_p_filter(probs, 0.71)
    assert torch.equal(out[[1, 3, 4]], probs[[1, 3, 4]])  # kept probabilities are unchanged (not renormalised)
    assert out[[0, 2]].sum() == 0
    assert torch.equal(probs, torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15]))  # the input is not modified


def test_top_p_works_per_row():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    out = top_p_filter(probs, 0.55)
    assert torch.equal(out, torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.6]]))


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0, 0.5).tolist() == [1, 0]
    assert int(sample_next(logits[0], 0.0)) == 1  # a single row [V] gives a 0-dim tensor
    assert sample_next(logits[0], 0.0).dim() == 0


def test_temperature_scales_the_softmax():
    logits = torch.tensor([0.0, math.log(3.0)])
    assert torch.allclose(sampling_probs(logits, 1.0), torch.tensor([0.25, 0.75]))
    # T = 2 halves the log-odds: odds sqrt(3)
    p = sampling_probs(logits, 2.0)
    assert math.isclose(float(p[1] / p[0]), math.sqrt(3.0), rel_tol=1e-5)
    assert sampling_probs(logits.half(), 1.0).dtype == torch.float32


def test_seeded_sampling_is_deterministic_and_matches_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [int(sample_next(logits, 1.0, 1.0, g1)) for _ in range(50)]
    b = [int(sample_next(logits, 1.0, 1.0, g2)) for _ in range(50)]
    assert a == b
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(20000, 4), 1.0, 0.9, g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    # top_p 0.9 keeps {0.5, 0.3, 0.15}; renormalised 0.526, 0.316, 0.158; the 0.05 token never appears
    assert freq[3] == 0
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.15]) / 0.95, atol=0.015)


def test_generate_engine_and_constraint_use_the_shared_sampler():
    import openk2.model.generate as generate
    import openk2.serve.constrained as constrained
    import openk2.serve.engine as engine

    assert generate.sample_next is sample_next and engine.sample_next is sample_next
    assert constrained.sampling_probs is sampling_probs


def test_top_p_zero_keeps_the_most_likely_token():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    kept = top_p_filter(probs, 0.0)
    assert torch.equal(kept > 0, torch.tensor([[False, True, False], [True, False, False]]))
    assert torch.equal(sample_next(probs.log(), temperature=1.0, top_p=0.0), torch.tensor([1, 0]))
