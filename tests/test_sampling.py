"""Sampling: parameter validation, hand-computed filter masks, frequencies over seeded draws, reproducibility."""

import math

import pytest
import torch

from hybrid.model.sampling import SamplingError, SamplingParams, filtered_probs, sample

P = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = P.log()  # softmax(LOGITS) == P


def test_defaults_follow_moonshot():
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.max_tokens, p.stop) == (1.0, 1.0, 0, 0.0, None, None, ())
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop="</x>").stop == ("</x>",)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
        ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("min_p", -0.1),
        ("min_p", 1.1), ("seed", -1), ("seed", 1.0), ("seed", 2**64), ("max_tokens", 0), ("max_tokens", 3.0),
        ("stop", [""]), ("stop", [1]),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(SamplingError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})


def test_greedy():
    g = torch.Generator().manual_seed(0)
    assert sample(torch.tensor([0.1, 2.0, -1.0, 2.0]), SamplingParams(temperature=0), g) == 1  # first maximum
    assert sample(torch.tensor([0.0, 1.0], dtype=torch.bfloat16), SamplingParams(temperature=0.0), g) == 1
    assert filtered_probs(LOGITS, SamplingParams(temperature=0)).tolist() == [1.0, 0.0, 0.0, 0.0]


def _close(a, b):
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), atol=1e-6)


def test_masks_by_hand():
    assert _close(filtered_probs(LOGITS, SamplingParams()), P.tolist())
    assert _close(filtered_probs(LOGITS, SamplingParams(top_k=2)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert _close(filtered_probs(LOGITS, SamplingParams(top_k=1)), [1, 0, 0, 0])
    assert _close(filtered_probs(LOGITS, SamplingParams(top_k=10)), P.tolist())
    # top_p: the smallest set whose mass reaches p
    assert _close(filtered_probs(LOGITS, SamplingParams(top_p=0.7)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    assert _close(filtered_probs(LOGITS, SamplingParams(top_p=0.4)), [1, 0, 0, 0])
    assert _close(filtered_probs(LOGITS, SamplingParams(top_p=0.9)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    # min_p: keep p >= min_p * max p
    assert _close(filtered_probs(LOGITS, SamplingParams(min_p=0.25)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert _close(filtered_probs(LOGITS, SamplingParams(min_p=0.7)), [1, 0, 0, 0])
    # temperature 2 on log-probs: p_i^(1/2), renormalised
    root = P.sqrt() / P.sqrt().sum()
    assert _close(filtered_probs(LOGITS, SamplingParams(temperature=2.0)), root.tolist())
    # order temperature -> top_k -> top_p: top_k=3 leaves [.5,.3,.15]/.95, then top_p=0.8 keeps two
    assert _close(filtered_probs(LOGITS, SamplingParams(top_k=3, top_p=0.8)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])


def test_top_k_keeps_ties_and_masked_logits_stay_masked():
    logits = torch.tensor([1.0, 1.0, 1.0, -math.inf, 0.0])
    assert _close(filtered_probs(logits, SamplingParams(top_k=2)), [1 / 3, 1 / 3, 1 / 3, 0, 0])


def _frequencies(logits, params, n=10_000, seed=1234):
    g = params.make_generator() if params.seed is not None else torch.Generator().manual_seed(seed)
    counts = torch.zeros(logits.numel())
    for _ in range(n):
        counts[sample(logits, params, g)] += 1
    return counts / n


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(), [0.5, 0.3, 0.15, 0.05]),
        (SamplingParams(top_k=2), [0.625, 0.375, 0, 0]),
        (SamplingParams(top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
        (SamplingParams(min_p=0.25, temperature=2.0, seed=7), None),
    ],
)
def test_frequencies_over_seeded_draws(params, expected):
    if expected is None:
        expected = filtered_probs(LOGITS, params).tolist()
    freq = _frequencies(LOGITS, params)
    assert torch.allclose(freq, torch.tensor(expected), atol=0.02), freq  # ~4 standard errors at n=10k
    assert all(f == 0 for f, e in zip(freq.tolist(), expected) if e == 0)  # masked tokens never drawn


def test_seed_reproduces_and_differs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(seed=42, top_p=0.95)

    def run(p):
        g = p.make_generator()
        return [sample(logits, p, g) for _ in range(50)]

    assert run(params) == run(params)
    assert run(params) != run(SamplingParams(seed=43, top_p=0.95))
    assert len(set(run(SamplingParams()))) > 1  # unseeded still samples


def test_bad_logits():
    g = torch.Generator()
    with pytest.raises(SamplingError, match="one row"):
        sample(torch.zeros(2, 3), SamplingParams(), g)
    with pytest.raises(SamplingError, match="NaN"):
        sample(torch.tensor([0.0, math.nan]), SamplingParams(), g)
    with pytest.raises(SamplingError, match="no finite"):
        sample(torch.full((3,), -math.inf), SamplingParams(), g)


@pytest.mark.parametrize("logits, says", [([1.0, math.nan, 2.0], "NaN"), ([-math.inf, -math.inf], "no finite")])
def test_greedy_checks_the_logits_too(logits, says):
    # argmax would quietly answer token 1 (NaN) or token 0; a broken forward pass must be an error
    greedy, g = SamplingParams(temperature=0), torch.Generator()
    with pytest.raises(SamplingError, match=says):
        sample(torch.tensor(logits), greedy, g)
    with pytest.raises(SamplingError, match=says):
        filtered_probs(torch.tensor(logits), greedy)
    with pytest.raises(SamplingError, match="one row"):
        sample(torch.zeros(2, 3), greedy, g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_greedy_takes_the_first_maximum_in_every_dtype(dtype):
    # fp32 on the CPU goes through NumPy's argmax, the rest through torch's: the same answer either way
    from hybrid.runtime import token_loop

    greedy, g = SamplingParams(temperature=0), torch.Generator()
    for row, want in (([1.0, 3.0, 3.0, 2.0], 1), ([0.0, math.inf, math.inf], 1), ([-math.inf, -5.0, -math.inf], 1),
                      ([2.0, -1.0, 2.0], 0)):
        assert sample(torch.tensor(row, dtype=dtype), greedy, g) == want
        assert token_loop.greedy(torch.tensor(row, dtype=dtype)) == want  # the engine's own greedy sampler
    wide = torch.linspace(-3, 3, 1280)[torch.randperm(1280, generator=torch.Generator().manual_seed(0))]
    assert sample(wide.to(dtype), greedy, g) == int(torch.argmax(wide.to(dtype)))


def test_stop_matcher_every_split_point():
    from hybrid.model.sampling import StopMatcher

    text = "abc STOP? no, STOP! tail"
    for k in range(len(text) + 1):
        m = StopMatcher(["STOP!", "xyz"])
        a, hit_a = m.feed(text[:k])
        b, hit_b = m.feed(text[k:])
        assert a + b == "abc STOP? no, " and hit_b and m.stopped == "STOP!"
        assert m.feed("more") == ("", True)
    m = StopMatcher(["</end>"])
    assert m.feed("x </en") == ("x ", False)
    assert m.feed("x") == ("</enx", False)
    assert m.feed("</e") == ("", False) and m.flush() == "</e"
    assert StopMatcher([]).feed("anything") == ("anything", False)
