"""The expert cache and its policies: a contract every policy passes, eviction orders worked out
by hand, a slow reference re-implementation of each policy compared on random traces, and OPT
as an upper bound of the online policies."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micro_expert_router.cache import (
    LCP,
    LFU,
    LRU,
    OPT,
    POLICIES,
    ExpertCache,
    FutureIndex,
    make_policy,
    parse_policy_spec,
    policy_factory,
)
from micro_expert_router.errors import ConfigError

# A step is a list of groups (one per layer, in layer order); a group is the distinct keys one
# layer requests in that step. Keys are (layer, expert).
ONLINE = ["lru", "lfu", "lfu:persistent=false", "lcp", "lcp:rho=0.5,omega=2",
          "lcp:rho=0.5,omega=7"]  # fmt: skip
SPECS = [*ONLINE, "opt", "opt:bypass=false"]
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def factory(spec: str, steps):
    name, params = parse_policy_spec(spec)
    if name == "opt":
        params["future"] = FutureIndex([k for g in s for k in g] for s in steps)
    return lambda: make_policy(name, **params)


def drive(steps, spec, budget, size=lambda k: 1, order=sorted, interleave=False):
    """Run ``steps`` through an ExpertCache the way the engine does (look the layer's experts
    up, then admit the misses with the layer protected). Returns per-request hits and the
    resident set after each step, checking the invariants as it goes."""
    evicted = []
    cache = ExpertCache(budget, factory(spec, steps), on_evict=lambda k, v: evicted.append((k, v)))
    hits, snaps, requests = [], [], 0
    for step in steps:
        cache.begin_token()
        for group in step:
            prot = frozenset(group)
            keys = list(order(group))
            if interleave:
                for k in keys:
                    requests += 1
                    hit = cache.lookup(k) is not None
                    hits.append((k, hit))
                    if not hit:
                        _admit(cache, k, size, prot, evicted, budget)
            else:
                looked = [(k, cache.lookup(k) is not None) for k in keys]
                requests += len(keys)
                hits += looked
                for k, hit in looked:
                    if not hit:
                        _admit(cache, k, size, prot, evicted, budget)
            assert cache.hits + cache.misses == requests
        snaps.append(frozenset(cache.keys()))
    return hits, snaps, cache


def _admit(cache, k, size, prot, evicted, budget):
    before, n_ev = set(cache.keys()), len(evicted)
    ok = cache.admit(k, ("value", k), size(k), prot)
    gone = {key for key, _ in evicted[n_ev:]}
    assert all(v == ("value", key) for key, v in evicted[n_ev:])  # the engine gets its value back
    assert not gone & prot, "a protected key was evicted"
    if ok:
        assert set(cache.keys()) == (before - gone) | {k}
    else:
        assert not gone and set(cache.keys()) == before, "a refused admit evicted something"
    assert cache.used_bytes == sum(size(x) for x in cache.keys())
    if isinstance(budget, dict):
        for layer, b in budget.items():
            assert sum(size(x) for x in cache.keys() if x[0] == layer) <= b
    else:
        assert cache.used_bytes <= budget


@st.composite
def traces(draw, max_layers=3, max_experts=6, max_steps=24):
    n_layers = draw(st.integers(1, max_layers))
    n_experts = draw(st.integers(1, max_experts))
    n_steps = draw(st.integers(0, max_steps))
    steps = []
    for _ in range(n_steps):
        step = []
        for layer in range(n_layers):
            ex = draw(st.lists(st.integers(0, n_experts - 1), min_size=1, max_size=3, unique=True))
            step.append(tuple(sorted((layer, e) for e in ex)))
        steps.append(step)
    return steps


# -- the slow reference ---------------------------------------------------------------------
def reference(steps, spec, budget, size=lambda k: 1):
    """Every policy straight from its definition, recomputing every priority from the full
    request history at each decision. Same outputs as ``drive``."""
    name, params = parse_policy_spec(spec)
    history: list[tuple[int, tuple]] = []  # (step, key) of every request so far
    future = [(t, k) for t, s in enumerate(steps) for g in s for k in g]
    resident: dict[tuple, int] = {}  # key -> history index of the request that admitted it
    hits, snaps = [], []

    def requests_of(k, since=0):
        return [t for t, kk in history[since:] if kk == k]

    def ahead(k):  # the (step, layer) moments k will be requested at, then "never"
        return ([(t, k[0]) for t, kk in future[len(history) :] if kk == k] + [(math.inf,)], k)

    def choose(cands, t):
        if name == "lru":
            return min(cands, key=lambda k: (requests_of(k)[-1], k))
        if name == "lfu":
            persistent = params.get("persistent", True)

            def count(k):
                return len(requests_of(k, 0 if persistent else resident[k]))

            return min(cands, key=lambda k: (count(k), requests_of(k)[-1], k))
        if name == "lcp":
            rho, omega = params.get("rho", 0.25), params.get("omega", 128)
            prio = {k: len(requests_of(k)) * rho ** ((t - requests_of(k)[-1]) / omega)
                    for k in cands}  # fmt: skip
            low = min(prio.values())
            ties = [k for k in cands if prio[k] <= low * (1 + 1e-9)]
            return min(ties, key=lambda k: (requests_of(k)[-1], k))
        assert name == "opt"
        return max(cands, key=ahead)

    for t, step in enumerate(steps):
        for group in step:
            idx = {}
            for k in group:
                hits.append((k, k in resident))
                idx[k] = len(history)
                history.append((t, k))
            for k in group:
                if k in resident:
                    continue
                cap = budget.get(k[0], 0) if isinstance(budget, dict) else budget
                if size(k) > cap:
                    continue
                part = [x for x in resident if not isinstance(budget, dict) or x[0] == k[0]]
                free = cap - sum(size(x) for x in part)
                victims = []
                while free < size(k):
                    cands = [x for x in part if x not in group and x not in victims]
                    if not cands:
                        victims = None
                        break
                    victims.append(choose(cands, t))
                    free += size(victims[-1])
                if victims is None:
                    continue
                if name == "opt" and params.get("bypass", True) and victims:
                    if not ahead(k) < min(ahead(v) for v in victims):
                        continue
                for v in victims:
                    del resident[v]
                resident[k] = idx[k]
        snaps.append(frozenset(resident))
    return hits, snaps


# -- contract -------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@HYP
@given(steps=traces(), budget=st.integers(0, 8), data=st.data())
def test_contract_and_reference(spec, steps, budget, data):
    sizes = data.draw(st.sampled_from(["unit", "mixed"]))
    size = (lambda k: 1) if sizes == "unit" else (lambda k: 1 + (k[1] * 7 + k[0]) % 3)
    hits, snaps, cache = drive(steps, spec, budget, size)
    assert (hits, snaps) == reference(steps, spec, budget, size)
    assert (hits, snaps) == drive(steps, spec, budget, size)[:2]  # deterministic
    assert cache.stats().requests == len(hits)


@pytest.mark.parametrize("spec", SPECS)
@HYP
@given(steps=traces(), data=st.data())
def test_per_layer_plan_matches_reference(spec, steps, data):
    plan = {layer: data.draw(st.integers(0, 4)) for layer in range(3)}
    hits, snaps, cache = drive(steps, spec, plan)
    assert (hits, snaps) == reference(steps, spec, plan)
    assert cache.budget_bytes == sum(plan.values())


@pytest.mark.parametrize("spec", ONLINE)
@HYP
@given(steps=traces(), budget=st.integers(0, 8), seed=st.integers(0, 2**16))
def test_order_inside_a_layer_does_not_matter(spec, steps, budget, seed):
    """Looking a layer's experts up first and admitting after (the engine) or interleaving (a
    naive replay) gives the same hits and residency. So does any order inside the layer, unless
    the layer alone overflows the budget: then the first admitted stay (the engine and the
    simulator both go in ascending id order)."""
    rng = random.Random(seed)

    def shuffled(g):
        g = list(g)
        rng.shuffle(g)
        return g

    hits, snaps, cache = drive(steps, spec, budget)
    assert drive(steps, spec, budget, interleave=True)[:2] == (hits, snaps)
    if cache.refused:
        return
    for inter in (False, True):
        h2, s2, _ = drive(steps, spec, budget, order=shuffled, interleave=inter)
        assert sorted(h2) == sorted(hits) and s2 == snaps


@HYP
@given(steps=traces(max_layers=2, max_experts=8, max_steps=30), budget=st.integers(1, 10))
def test_opt_hit_rate_bounds_every_online_policy(steps, budget):
    def n_hits(spec):
        return sum(h for _, h in drive(steps, spec, budget)[0])

    best = n_hits("opt")
    assert best >= n_hits("opt:bypass=false")
    for spec in ONLINE:
        assert best >= n_hits(spec), spec


@pytest.mark.parametrize("spec", SPECS)
def test_budget_zero_keeps_nothing(spec):
    steps = [[((0, 1), (0, 2))], [((0, 1),)]]
    hits, snaps, cache = drive(steps, spec, 0)
    assert not any(h for _, h in hits) and all(not s for s in snaps)
    assert cache.refused == 3 and cache.misses == 3


@pytest.mark.parametrize("spec", SPECS)
def test_refuses_rather_than_evict_protected(spec):
    steps = [[((0, 1), (0, 2))], [((0, 1), (0, 2), (0, 3))]]
    cache = ExpertCache(2, factory(spec, steps))
    for step in steps:
        cache.begin_token()
        for g in step:
            for k in [k for k in g if cache.lookup(k) is None]:
                cache.admit(k, 1, 1, g)
    assert set(cache.keys()) == {(0, 1), (0, 2)} and cache.refused == 1
    assert cache.admit((0, 9), 1, 3) is False  # larger than the whole budget


# -- eviction orders worked out by hand ------------------------------------------------------
def run_steps(policy, budget, steps):
    """Single-key steps on layer 0 (one global cache); returns the evicted keys in order."""
    evicted = []
    cache = ExpertCache(budget, policy, on_evict=lambda k, v: evicted.append(k[1]))
    for step in steps:
        cache.begin_token()
        group = tuple((0, e) for e in step)
        for k in [k for k in group if cache.lookup(k) is None]:
            cache.admit(k, True, 1, group)
    return evicted, sorted(k[1] for k in cache.keys())


def test_lru_order_by_hand():
    # a b c | a (hit) | d evicts b (oldest) | e evicts c
    assert run_steps(LRU(), 3, [[1], [2], [3], [1], [4], [5]]) == ([2, 3], [1, 4, 5])
    # 7 and 5 share a step: the smaller key goes first, whatever the request order
    assert run_steps(LRU(), 2, [[7, 5], [9]]) == ([5], [7, 9])


def test_lfu_order_by_hand():
    # counts 1:3, 2:1, 3:2 -> 4 evicts 2; then 4 (count 1, newer) and 3 (2): 5 evicts 4
    steps = [[1], [1], [1], [2], [3], [3], [4], [5]]
    assert run_steps(LFU(), 3, steps) == ([2, 4], [1, 3, 5])
    # equal counts: the least recently requested goes
    assert run_steps(LFU(), 2, [[1], [2], [1], [2], [3]]) == ([1], [2, 3])
    # persistence: 1 is hot (3), 2 hotter (4); 3 pushes 1 out, 1 returns and pushes 3 out.
    # Persistent, 1 comes back with count 4 and ties 2, which is older: 4 evicts 2.
    # Restarted at 1, it is the coldest: 4 evicts 1.
    steps = [[1]] * 3 + [[2]] * 4 + [[3], [1], [4]]
    assert run_steps(LFU(persistent=True), 2, steps) == ([1, 3, 2], [1, 4])
    assert run_steps(LFU(persistent=False), 2, steps) == ([1, 3, 1], [2, 4])


def test_lcp_order_by_hand():
    # rho 0.5, omega 1: P = mu * 0.5**nu. After [1] [1] [1] [2], at step 5 requesting 3:
    # P1 = 3 * 0.5**2 = 0.75, P2 = 1 * 0.5**1 = 0.5 -> 2 goes.
    # Step 6 requests 4: P1 = 3 * 0.5**3 = 0.375, P3 = 1 * 0.5**1 = 0.5 -> 1 goes.
    steps = [[1], [1], [1], [2], [3], [4]]
    assert run_steps(LCP(rho=0.5, omega=1), 2, steps) == ([2, 1], [3, 4])
    # LRU on the same trace evicts 1 first: LCP weighs frequency
    assert run_steps(LRU(), 2, steps)[0] == [1, 2]


def test_lcp_exact_tie_goes_to_the_least_recent():
    # defaults (rho 0.25, omega 128): mu=2 is worth exactly 64 steps of recency. Key 1 is
    # requested at steps 1 and 2, key 2 at step 66: equal P forever; 1 is older, so it goes.
    steps = [[1], [1]] + [[]] * 63 + [[2], [3]]
    assert run_steps(LCP(), 2, steps)[0] == [1]
    # one step less and key 2 is worth less than key 1
    steps = [[1], [1]] + [[]] * 62 + [[2], [3]]
    assert run_steps(LCP(), 2, steps)[0] == [2]
    # rho 0.5, omega 7: mu=2 is worth 7 steps, but 7 / ln 2 * ln 2 is 7.000000000000001 in
    # floats; the comparison grid keeps the exact tie a tie (without it, key 2 would go)
    lcp, a, b = LCP(rho=0.5, omega=7), (0, 1), (0, 2)
    lcp.on_miss(a, 0), lcp.on_insert(a, 0), lcp.on_hit(a, 0)  # mu 2 at step 0
    lcp.on_miss(b, 7), lcp.on_insert(b, 7)  # mu 1 at step 7
    assert lcp.victim(()) == a


def test_opt_order_by_hand():
    # Belady's textbook string in 3 frames, one key per step (steps counted from 0).
    seq = [7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2]
    steps = [[x] for x in seq]
    future = [[(0, x)] for x in seq]
    ev, res = run_steps(OPT(future, bypass=False), 3, steps)
    # step 3 (2): 7 and 1 never again -> 7 (the larger key); step 5 (3): 0 at 6, 1 never,
    # 2 at 8 -> 1; step 7 (4): 0 at 10, 2 at 8, 3 at 9 -> 0; step 10 (0): 4 never -> 4
    assert ev == [7, 1, 0, 4] and res == [0, 2, 3]
    # with bypass, 4 (never used again) is not admitted at step 7, and 0 stays
    ev, res = run_steps(OPT(future), 3, steps)
    assert ev == [7, 1] and res == [0, 2, 3]


def test_lookup_tells_the_policy_and_counts_layers():
    cache = ExpertCache(4, "lru")
    cache.begin_token()
    assert cache.lookup((3, 1)) is None
    assert cache.admit((3, 1), "lease", 2)
    assert cache.lookup((3, 1)) == "lease" and cache.peek((3, 1)) == "lease"
    s = cache.stats()
    assert (s.hits, s.misses, s.layer_hit_rate()) == (1, 1, {3: 0.5})
    with pytest.raises(ValueError):
        cache.admit((3, 1), "again", 1)
    cache.reset_stats()
    assert cache.stats().requests == 0 and (3, 1) in cache


def test_clear_hands_every_value_back():
    got = []
    cache = ExpertCache({0: 2, 1: 1}, "lcp", on_evict=lambda k, v: got.append(v))
    for k in [(0, 1), (0, 2), (1, 5)]:
        cache.admit(k, k, 1)
    cache.clear()
    assert sorted(got) == [(0, 1), (0, 2), (1, 5)] and len(cache) == 0 and cache.used_bytes == 0


# -- registry and errors ---------------------------------------------------------------------
def test_registry_names_and_parameters():
    assert set(POLICIES) == {"lru", "lfu", "lcp", "opt"}
    assert parse_policy_spec("lcp:rho=0.5, omega=64") == ("lcp", {"rho": 0.5, "omega": 64})
    assert parse_policy_spec("lfu:persistent=false") == ("lfu", {"persistent": False})
    assert isinstance(policy_factory("lcp:omega=8")(), LCP)
    bad_specs = [("nope", "unknown cache policy 'nope'"), ("lcp:tau=1", "no parameter tau"),
                 ("lcp:rho=2", "rho must be"), ("lcp:omega=0", "omega must be"),
                 ("lcp:rho", "name=value"), ("lfu:persistent=3", "true or false")]  # fmt: skip
    for bad, words in bad_specs:
        with pytest.raises(ConfigError, match=words):
            policy_factory(bad)()
    with pytest.raises(ConfigError, match="offline"):
        make_policy("opt")
    with pytest.raises(ConfigError, match="requested 2 times"):
        opt = OPT([[(0, 1)]])
        opt.on_miss((0, 1), 1)
        opt.on_miss((0, 1), 2)
    with pytest.raises(ConfigError, match="budget"):
        ExpertCache(-1)
    with pytest.raises(ConfigError, match="layer 'x'"):
        ExpertCache({"x": 3})
