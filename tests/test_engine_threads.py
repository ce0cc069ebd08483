"""One Engine, several callers (issue #15): threads are served one generation at a time, a newer request
on the same thread supersedes its older generator, and whatever callers do (abandon a generator,
supersede one, close the engine under one) every completed run gives the single-threaded tokens and
the KV cache's bookkeeping stays exact, so later requests give them too."""
from __future__ import annotations

import threading

import pytest

import hybrid
from kernels_cpu.simd import host_has_avx2

pytestmark = pytest.mark.skipif(not host_has_avx2(), reason="the Numba INT4 kernels need AVX2 + FMA")

# different prompts, one a prefix-sharing variant of another (the cache reuses a prefix between them)
PROMPTS = (tuple(range(5, 40)), tuple(range(5, 30)) + (7, 8, 9), tuple(range(50, 70)))
N = 8
JOIN_S = 120.0  # bounded waits: a deadlock fails the test instead of hanging it


def load(path):
    return hybrid.load(path, backend="numba", expert_mode="mmap")


def greedy(engine, prompt, n=N):
    return [s.token for s in engine.generate(list(prompt), n, temperature=0)]


@pytest.fixture(scope="module")
def reference(tiny_path) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's greedy tokens, single-threaded, each on a fresh engine."""
    return {p: greedy(load(tiny_path), p) for p in PROMPTS}


def run_threads(target, n: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            target(i)
        except BaseException as e:  # handed to the test thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a thread is stuck on the engine"
    return errors


def test_threads_hammering_one_engine_get_the_single_threaded_tokens(tiny_path, reference):
    e = load(tiny_path)
    results: list[tuple[tuple[int, ...], list[int]]] = []
    superseded: list[str] = []
    start = threading.Barrier(6)

    def worker(i: int) -> None:
        start.wait(JOIN_S)
        for k in range(4):
            p = PROMPTS[(i + k) % len(PROMPTS)]
            if i == 4:  # abandons a generator midway (closed, or just dropped)
                g = e.generate(list(p), N, temperature=0)
                got = [next(g).token for _ in range(k + 1)]
                assert got == reference[p][:k + 1]
                if k % 2:
                    g.close()
                del g
            elif i == 5 and k % 2 == 0:  # a newer request on the same thread supersedes the older one
                g = e.generate(list(p), N, temperature=0)
                assert next(g).token == reference[p][0]
                q = PROMPTS[(i + k + 1) % len(PROMPTS)]
                results.append((q, greedy(e, q)))
                with pytest.raises(RuntimeError, match="superseded by a newer request") as err:
                    next(g)
                superseded.append(str(err.value))
            else:
                results.append((p, greedy(e, p)))

    errors = run_threads(worker, 6)
    wrong = [(p[:3], toks, reference[p]) for p, toks in results if toks != reference[p]]
    # afterwards, single-threaded: the cache still matches its bookkeeping
    after = [(p[:3], toks) for p in PROMPTS + PROMPTS[::-1] if (toks := greedy(e, p)) != reference[p]]
    assert not errors and not wrong and not after, f"errors {errors}\nwrong {wrong}\nwrong afterwards {after}"
    assert len(results) == 5 * 4 and len(superseded) == 2


def test_a_second_thread_waits_for_the_live_generation(tiny_path, reference):
    """A thread's request waits while another thread's generation is live (started, not finished or
    closed), then runs: neither corrupts the other."""
    e = load(tiny_path)
    a, b = PROMPTS[0], PROMPTS[2]
    g = e.generate(list(a), N, temperature=0)
    first = [next(g).token]
    asked = threading.Event()
    other: list[list[int]] = []

    def second(_: int) -> None:
        asked.set()
        other.append(greedy(e, b))

    t = threading.Thread(target=lambda: run_threads(second, 1) or None)
    t.start()
    assert asked.wait(JOIN_S)
    assert first + [s.token for s in g] == reference[a]  # the live one was not superseded or disturbed
    t.join(JOIN_S)
    assert other == [reference[b]]
    assert greedy(e, a) == reference[a]


def test_a_generator_used_after_close_says_the_engine_is_closed(tiny_path):
    e = load(tiny_path)
    g = e.generate(list(PROMPTS[0]), N, temperature=0)
    next(g)
    waiting = e.generate(list(PROMPTS[1]), N, temperature=0)  # not started: it starts after close
    e.close()
    for gen in (g, waiting):
        with pytest.raises(RuntimeError, match="this engine is closed"):
            next(gen)
    g.close()


def test_a_thread_waiting_for_its_turn_is_told_the_engine_closed(tiny_path):
    e = load(tiny_path)
    g = e.generate(list(PROMPTS[0]), N, temperature=0)
    next(g)
    asked = threading.Event()

    def second(_: int) -> None:
        asked.set()
        greedy(e, PROMPTS[2])

    box: list[list[BaseException]] = []
    t = threading.Thread(target=lambda: box.append(run_threads(second, 1)))
    t.start()
    assert asked.wait(JOIN_S)
    e.close()
    t.join(JOIN_S)
    assert len(box) == 1 and len(box[0]) == 1 and "this engine is closed" in str(box[0][0])
    with pytest.raises(RuntimeError, match="this engine is closed"):
        next(g)
