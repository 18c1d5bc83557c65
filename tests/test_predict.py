"""Predictors on hand-built routing with known answers (and a slow reference for the Markov
chains), the controller's budget, residency and scoring rules, and the prefetch replay: it never
changes what the cache holds, respects its staging slots, and never exposes more misses than the
same replay without prefetch."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micro_expert_router.errors import ConfigError
from micro_expert_router.predict import (
    OFF,
    ON,
    PROBE,
    LocalityMonitor,
    MarkovLayers,
    MarkovTokens,
    NeuralSpeculator,
    PrefetchController,
    ScoringRule,
    gate_probs,
    make_predictor,
    parse_predictors,
    window_budget,
)
from micro_expert_router.sim import simulate
from micro_expert_router.sim.prefetch import PrefetchReplay, simulate_prefetch, summary
from micro_expert_router.trace import Trace

OLMOE = Path(__file__).resolve().parents[1].parent / "shared/data/traces/olmoe-1b-7b-llamacpp"
needs_olmoe = pytest.mark.skipif(not OLMOE.is_dir(), reason="../shared/data is not present")


def feed(pred, rows, layers, start_step=0):
    """Observe ``rows[t][j]`` = the experts of layer j at step start_step + t."""
    for t, row in enumerate(rows):
        for layer, experts in zip(layers, row, strict=True):
            pred.observe(start_step + t, layer, experts)


# -- S and T -------------------------------------------------------------------------------------
def test_markov_layers_learns_a_second_order_rule_exactly():
    """Layer 2 routes to 2 + (a xor b), a and b the experts of layers 0 and 1: a first-order
    chain on layer 1 alone sees a coin flip, the second-order chain is certain."""
    rng = np.random.default_rng(0)
    m = MarkovLayers((0, 1, 2), 4, 1)
    rows = []
    for _ in range(60):
        a, b = rng.integers(0, 2, size=2).tolist()
        rows.append([[a], [b], [2 + (a ^ b)]])
    feed(m, rows, (0, 1, 2))
    for a in (0, 1):
        for b in (0, 1):
            step = 60 + 2 * a + b
            m.observe(step, 0, [a])
            m.observe(step, 1, [b])
            assert m.predict(2, step) == {(2, 2 + (a ^ b)): 1.0}
            m.observe(step, 2, [2 + (a ^ b)])


def test_markov_tokens_learns_a_period_four_cycle():
    """Per layer the sets go A A B B A A B B ...: after A the next is A or B, after (A, A) it is
    always B, after (A, B) always B, after (B, B) always A, after (B, A) always A."""
    a, b = [0, 3], [1, 2]
    cycle = [a, a, b, b]
    m = MarkovTokens((5, 7), 4, 2)
    rows = [[cycle[t % 4], cycle[(t + 1) % 4]] for t in range(24)]
    feed(m, rows, (5, 7))
    for t in range(24, 32):
        for j, layer in enumerate((5, 7)):
            want = cycle[(t + j) % 4]
            assert m.predict(layer, t) == {(layer, e): 1.0 for e in want}
            m.observe(t, layer, want)


def markov_reference(obs, layers, e, far, near, half_life, max_context, target):
    """Slow pooled 2nd-order chain: ``obs`` is [(step, layer, experts)] in order."""
    index = {l: j for j, l in enumerate(layers)}
    counts = defaultdict(lambda: np.zeros(e))
    totals = defaultdict(float)
    seen = {}
    for step, layer, x in obs:
        p = step * len(layers) + index[layer]
        x = sorted(set(x))
        seen[p] = x if len(x) <= max_context else None
        a, b = seen.get(p - far), seen.get(p - near)
        if seen[p] is None or a is None or b is None:
            continue
        w = 2.0 ** (step / half_life)
        for u in a:
            for v in b:
                key = (index[layer], u, v)
                totals[key] += w
                for c in x:
                    counts[key][c] += w
    step, layer = target
    p = step * len(layers) + index[layer]
    a, b = seen.get(p - far), seen.get(p - near)
    keys = [(index[layer], u, v) for u in a for v in b if (index[layer], u, v) in totals]
    if not keys:
        return {}
    s = sum(counts[k] for k in keys) / sum(totals[k] for k in keys)
    return {(layer, c): float(s[c]) for c in range(e) if s[c] > 0}


@pytest.mark.parametrize("half_life", [1e9, 8.0, 0.5])  # 0.5 rescales the table many times
@pytest.mark.parametrize("along", ["layers", "tokens"])
def test_markov_matches_the_slow_reference(along, half_life):
    rng = np.random.default_rng(1)
    layers, e, k = (0, 2, 3), 6, 2
    if along == "layers":
        m = MarkovLayers(layers, e, k, half_life=half_life)
    else:
        m = MarkovTokens(layers, e, k, half_life=half_life)
    obs = []
    for step in range(40):
        for layer in layers:
            hot = [0, 1] if layer == 2 else [2, 3]  # some structure, some noise
            x = rng.choice(hot + [4, 5], size=k, replace=False).tolist()
            obs.append((step, layer, x))
    obs.append((40, 0, rng.choice(e, size=k, replace=False).tolist()))
    for step, layer, x in obs:
        m.observe(step, layer, x)
    target = (40, 2) if along == "layers" else (40, 3)
    got = m.predict(target[1], target[0])
    want = markov_reference(obs, layers, e, m.far, m.near, half_life, m.max_context, target)
    assert got.keys() == want.keys() and got
    for key in want:
        assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-6)


def test_markov_memory_stays_bounded():
    rng = np.random.default_rng(2)
    m = MarkovLayers(range(4), 16, 4, max_states=64)
    nbytes = m.nbytes
    for step in range(200):
        for layer in range(4):
            m.observe(step, layer, rng.choice(16, size=4, replace=False))
            assert len(m.table.row) <= 64
    assert m.nbytes == nbytes
    s = m.predict(1, 200) or m.predict(0, 200)
    assert all(0.0 < v <= 1.0 for v in s.values())
    assert len(m.history) <= m.far


def test_markov_decay_forgets_old_habits():
    """The context (0, 0) is followed by 0 at steps 2..49 and by 1 at step 50."""
    seq = [[[0]]] * 50 + [[[1]]] + [[[0]], [[0]]]
    slow = MarkovTokens((0,), 4, 1, half_life=1e9)
    fast = MarkovTokens((0,), 4, 1, half_life=0.5)  # weights x4 per step
    feed(slow, seq, (0,))
    feed(fast, seq, (0,))
    assert slow.predict(0, 53) == pytest.approx({(0, 0): 48 / 49, (0, 1): 1 / 49})
    old = sum(4.0**t for t in range(2, 50))
    assert fast.predict(0, 53) == pytest.approx(
        {(0, 0): old / (old + 4.0**50), (0, 1): 4.0**50 / (old + 4.0**50)}, rel=1e-4
    )


def test_markov_starts_over_on_a_new_sequence_and_skips_prefill_unions():
    m = MarkovLayers((0, 1), 8, 2)
    feed(m, [[[0, 1], [2, 3]]] * 5, (0, 1))
    assert m.predict(0, 5) == {(0, 0): 1.0, (0, 1): 1.0}
    m.observe(0, 0, [0, 1])  # step 0 again: a new generation
    assert m.predict(1, 0) == {}  # its context (the previous position) belongs to the old one
    rows_before = len(m.table.row)
    m.observe(0, 1, list(range(8)))  # a prefill union, wider than max_context = 4
    m.observe(1, 0, [0, 1])
    assert len(m.table.row) == rows_before
    assert m.predict(1, 1) == {}


# -- L -------------------------------------------------------------------------------------------
def test_locality_monitor_counts_the_window():
    lm = LocalityMonitor((3, 4), 5, 2, window=3)
    assert lm.predict(3, 0) == {}
    seq = [[0, 1], [1, 2], [1, 3], [3, 4]]
    for t, x in enumerate(seq):
        lm.observe(t, 3, x)
        lm.observe(t, 4, [0, 1])
    # the window holds steps 1..3: {1,2}, {1,3}, {3,4}
    assert lm.predict(3, 4) == pytest.approx({(3, 1): 2 / 3, (3, 2): 1 / 3, (3, 3): 2 / 3,
                                              (3, 4): 1 / 3})  # fmt: skip
    assert lm.predict(4, 4) == {(4, 0): 1.0, (4, 1): 1.0}


# -- M -------------------------------------------------------------------------------------------
def test_gate_probs_matches_a_slow_softmax():
    rng = np.random.default_rng(3)
    h, w = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    got = gate_probs(h, w)
    for t in range(3):
        z = [sum(h[t, d] * w[e, d] for d in range(5)) for e in range(4)]
        ex = [math.exp(v - max(z)) for v in z]
        assert got[t] == pytest.approx([v / sum(ex) for v in ex], rel=1e-5)


def test_neural_speculator_applies_the_next_gate():
    rng = np.random.default_rng(4)
    e, d = 6, 8
    gates = {1: rng.standard_normal((e, d)), 2: rng.standard_normal((e, d))}
    m = NeuralSpeculator((0, 1, 2), e, 2, gates=gates, top_n=3)
    h = rng.standard_normal(d)
    m.observe(0, 0, [0, 1], hidden=h)
    got = m.predict(1, 0)
    p = gate_probs(h[None], gates[1])[0]
    top = np.argsort(-p)[:3]
    assert got == pytest.approx({(1, int(x)): min(1.0, 2 * p[x]) for x in top})
    assert m.predict(2, 0)  # a later layer of the same step, from the same hidden state
    assert m.predict(0, 1) == {}  # the next token: no hidden state yet
    hp = rng.standard_normal((4, d))  # a prefill step: the max over its tokens
    m.observe(1, 0, [0, 1, 2], hidden=hp)
    pp = gate_probs(hp, gates[1]).max(0)
    assert m.predict(1, 1)[(1, int(np.argmax(pp)))] == pytest.approx(min(1.0, 2 * pp.max()))
    m.observe(1, 1, [0, 1])  # no hidden state: nothing to say
    assert m.predict(2, 1) == {}
    import torch  # the engine hands over bf16 tensors

    gb = {l: torch.tensor(w).bfloat16() for l, w in gates.items()}
    hb = torch.tensor(h).bfloat16()
    mt = NeuralSpeculator((0, 1, 2), e, 2, gates=gb)  # top_n = 2K = 4
    mt.observe(0, 0, torch.tensor([0, 1]), hidden=hb)
    p = gate_probs(hb.float().numpy()[None], gb[1].float().numpy())[0]
    assert mt.predict(1, 0) == pytest.approx(
        {(1, int(x)): min(1.0, 2 * p[x]) for x in np.argsort(-p, kind="stable")[:4]}
    )
    with pytest.raises(ConfigError, match="D=8"):
        m.observe(2, 0, [0], hidden=np.zeros(5))
    with pytest.raises(ConfigError, match="no gate weight for MoE layer 2"):
        NeuralSpeculator((0, 1, 2), e, 2, gates={1: gates[1]})
    with pytest.raises(ConfigError, match="gate weights"):
        make_predictor("m", (0, 1), e, 2)


# -- the controller ------------------------------------------------------------------------------
class Fixed:
    """A predictor that says what it is told (the controller under test is the real one)."""

    def __init__(self, name, scores):
        self.name, self.scores, self.calls = name, scores, 0

    def observe(self, step, layer, experts, hidden=None):
        pass

    def predict(self, layer, step):
        self.calls += 1
        return {(layer, e): s for e, s in self.scores.items()}


def test_plan_skips_resident_and_in_flight_and_respects_slots_and_budget():
    p = Fixed("a", {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.6, 4: 0.5, 5: 0.01})
    ctl = PrefetchController([p], (0, 1), 8, 4, per_predictor=6)
    ctl.observe(0, 0, [0, 1])
    pf = ctl.plan(0, 0, resident={(1, 0)}, in_flight={(1, 2)}, free_slots=8)
    assert pf.target == (0, 1)
    assert pf.keys == ((1, 1), (1, 3), (1, 4))  # 5 scores below min_use
    ctl.observe(0, 1, [1])
    pf = ctl.plan(0, 1, resident=(), free_slots=2)  # from the last layer: next step, layer 0
    assert pf.target == (1, 0) and pf.keys == ((0, 0), (0, 1))
    ctl.observe(1, 0, [0])
    pf = ctl.plan(1, 0, resident=(), budget_bytes=3 * 100 - 1, expert_bytes=100, free_slots=9)
    assert len(pf.keys) == 2
    assert ctl.plan(1, 0, resident=(), budget_bytes=0, free_slots=9).keys == ()
    with pytest.raises(ConfigError):
        ctl.plan(1, 0, resident=(), free_slots=-1)
    assert window_budget(2e9, 0.5) == 1_000_000_000


def test_union_ranks_by_the_most_confident_calibrated_predictor():
    good = Fixed("good", {0: 0.9, 1: 0.5})
    bad = Fixed("bad", {6: 1.0, 7: 1.0})
    ctl = PrefetchController([good, bad], (0,), 8, 2, rule=ScoringRule(min_candidates=1000))
    for t in range(20):  # routing is always {0, 1}: good hits, bad never does
        ctl.observe(t, 0, [0, 1])
        pf = ctl.plan(t, 0, resident=(), free_slots=2)
    assert pf.keys == ((0, 0), (0, 1))  # bad's 1.0 claims are calibrated down to ~1/40
    sc = ctl.scores()[0]
    assert (sc["good"].precision, sc["good"].recall) == (1.0, 1.0)
    assert (sc["bad"].precision, sc["bad"].recall) == (0.0, 0.0)
    assert sc["issued"].hits == sc["issued"].candidates - 2  # the first plan trusted bad


def test_scoring_turns_off_a_useless_predictor_and_probes_it_again():
    rule = ScoringRule(window=4, min_candidates=4, probe_every=5, probe_len=3, max_backoff=4)
    p = Fixed("p", {6: 1.0, 7: 1.0})  # routing is {0, 1}: never right
    ctl = PrefetchController([p], (0,), 8, 2, rule=rule)
    log = []
    for t in range(60):
        if t == 40:
            p.scores = {0: 1.0, 1: 1.0}  # it turns useful
        ctl.observe(t, 0, [0, 1])
        before = p.calls
        pf = ctl.plan(t, 0, resident=(), free_slots=4)
        log.append((ctl.states()[(0, "p")], p.calls - before, len(pf.keys)))
    states = [s for s, _, _ in log]
    # on for the first two plans; judged after 2 evaluations (4 candidates): off
    assert states[:2] == [ON, ON] and states[2] == OFF
    # off: not asked for probe_every - 1 plans, then probed (asked, never issuing)
    assert all(called == 0 for s, called, _ in log if s == OFF)
    assert all(called == 1 and issued == 0 for s, called, issued in log if s == PROBE)
    assert all(issued == 2 for s, _, issued in log if s == ON)
    # the off spells: probe_every x backoff plans (the last one starts the probe), the backoff
    # doubling after each failed probe
    offs = [len(list(g)) for s, g in itertools.groupby(states) if s == OFF]
    assert offs == [4, 9, 19]
    assert states[-1] == ON  # after t = 40 a probe found it useful again
    sc = ctl.scores()[0]["p"]
    assert sc.issuing < sc.targets


def test_controller_rejects_bad_settings():
    with pytest.raises(ConfigError, match="lookahead"):
        PrefetchController([], (0, 1), 4, 2, lookahead=3)
    with pytest.raises(ConfigError, match="distinct"):
        PrefetchController([Fixed("a", {}), Fixed("a", {})], (0,), 4, 2)
    with pytest.raises(ConfigError, match="not one of the MoE layers"):
        PrefetchController([], (0, 1), 4, 2).observe(0, 5, [0])
    with pytest.raises(ConfigError, match="outside"):
        PrefetchController([], (0, 1), 4, 2).observe(0, 1, [4])
    with pytest.raises(ConfigError):
        ScoringRule(window=0)


def test_predictor_specs():
    assert parse_predictors("s,l:window=64,m") == [("s", {}), ("l", {"window": 64}), ("m", {})]
    assert parse_predictors("s:half_life=128,max_states=4096,t") == [
        ("s", {"half_life": 128, "max_states": 4096}), ("t", {})]  # fmt: skip
    for bad, msg in (("x", "unknown predictor"), ("s,s", "twice"), ("window=3", "names no")):
        with pytest.raises(ConfigError, match=msg):
            parse_predictors(bad)
    with pytest.raises(ConfigError, match="predictor 'l'"):
        make_predictor("l", (0,), 4, 2, windw=3)
    with pytest.raises(ConfigError, match="window"):
        make_predictor("l", (0,), 4, 2, window=0)


# -- the replay ----------------------------------------------------------------------------------
def cyclic_trace(tokens=40, layers=3, e=6, k=2):
    """Every token routes layer j to the same experts: fully predictable."""
    row = [[(j + i) % e for i in range(k)] for j in range(layers)]
    return Trace.from_arrays(np.array([row] * tokens), e)


def test_a_predictable_trace_has_no_exposed_misses():
    tr = cyclic_trace()
    r = simulate_prefetch(tr, "lru", 0, predictors="s", warmup=10)  # nothing is ever cached
    assert r.misses == r.requests == 30 * 3 * 2
    assert (r.exposed, r.wasted, r.issued) == (0, 0, r.misses)
    assert r.exposed_misses_per_token == 0 and r.prefetch_bytes_per_token == 6
    one = simulate_prefetch(tr, "lru", 0, predictors="s", warmup=10, window_bytes=1)
    assert one.exposed == one.misses // 2  # one of the two experts per layer window
    d = summary(one, 1.0)
    assert d["exposed_misses_per_token"] == 3 and d["prefetch_bytes_per_token"] == 3
    assert d["per_layer"]["0"]["s"]["precision"] == 1.0


def test_replay_matches_sim_and_never_changes_residency():
    rng = np.random.default_rng(5)
    ex = np.stack([rng.choice(8, size=2, replace=False) for _ in range(3 * 60)])
    tr = Trace.from_arrays(ex.reshape(60, 3, 2), 8)
    replay = PrefetchReplay(tr)
    for policy, budget in (("lru", 7), ("lcp", 5), ("opt", 6), ("lru", {0: 3, 1: 2, 2: 1})):
        snaps = {}
        for preds in ("", "s,t,l"):
            seen = snaps[preds] = []
            r = replay.run(policy, budget, predictors=preds, warmup=5, staging_slots=3,
                           on_step=lambda i, c, s, seen=seen: seen.append(
                               (sorted(c.keys()), len(s))))  # fmt: skip
            base = simulate(tr, policy, budget, warmup=5)
            assert (r.hits, r.misses) == (base.hits, base.misses)
            assert r.max_staged <= 3 and all(n <= 3 for _, n in seen)
        assert [c for c, _ in snaps[""]] == [c for c, _ in snaps["s,t,l"]]
        assert r.exposed <= r.misses and r.covered <= r.issued


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n_layers=st.integers(1, 4),
    e=st.integers(2, 8),
    tokens=st.integers(3, 30),
)
def test_exposed_misses_never_exceed_misses_without_prefetch(data, n_layers, e, tokens):
    k = data.draw(st.integers(1, e))
    ids = data.draw(st.lists(st.permutations(range(e)), min_size=tokens * n_layers,
                             max_size=tokens * n_layers))  # fmt: skip
    tr = Trace.from_arrays(np.array([p[:k] for p in ids]).reshape(tokens, n_layers, k), e)
    policy = data.draw(st.sampled_from(["lru", "lfu", "lcp", "opt"]))
    budget = data.draw(st.integers(0, n_layers * e))
    preds = data.draw(st.lists(st.sampled_from("stl"), unique=True))
    window = data.draw(st.none() | st.integers(0, 2 * k))
    slots = data.draw(st.integers(0, 3 * k))
    lookahead = data.draw(st.integers(1, n_layers))
    r = simulate_prefetch(tr, policy, budget, predictors=",".join(preds), window_bytes=window,
                          staging_slots=slots, lookahead=lookahead)  # fmt: skip
    base = simulate(tr, policy, budget)
    assert r.misses == base.misses
    assert 0 <= r.exposed <= base.misses
    assert r.covered <= r.issued and r.max_staged <= slots
    if window is not None:
        assert r.issued <= window * tokens * n_layers


def test_random_routing_turns_the_predictors_off():
    """Uniform random routing: nothing to predict, so skill stays near 0 and prefetch stops."""
    rng = np.random.default_rng(6)
    ex = np.stack([rng.permutation(16)[:2] for _ in range(300 * 3)]).reshape(300, 3, 2)
    r = simulate_prefetch(Trace.from_arrays(ex, 16), "lru", 12, predictors="s,t,l", warmup=100)
    d = summary(r)
    for name in ("s", "t", "l"):
        sc = d["per_predictor"][name]
        assert sc["issuing"] <= 0.1 * sc["targets"], (name, sc)  # chance passes are rare
    assert r.prefetch_bytes_per_token < 0.1 * r.misses_per_token  # ungated: 11.7 per token
    assert r.exposed_misses_per_token > 0.95 * r.misses_per_token


def test_replay_errors_name_the_fix():
    tr = cyclic_trace()
    with pytest.raises(ConfigError, match="hidden states"):
        simulate_prefetch(tr, "lru", 4, predictors="s,m")
    with pytest.raises(ConfigError, match="warmup"):
        simulate_prefetch(tr, "lru", 4, warmup=100)
    with pytest.raises(ConfigError, match="unknown predictor"):
        simulate_prefetch(tr, "lru", 4, predictors="q")


@needs_olmoe
def test_olmoe_prefetch_covers_misses():
    from micro_expert_router.trace import read_trace

    tr = read_trace(OLMOE / "olmoe-all.tokens.jsonl")
    d = PrefetchReplay(tr).compare("lru", 256, predictors="s,l", warmup=200, window_bytes=8)
    assert d["tokens"] == 697 and len(d["per_layer"]) == 16
    assert d["exposed_misses_per_token"] < 0.5 * d["misses_per_token"]
    assert d["opt_misses_per_token"] < d["misses_per_token"]
    assert d["prefetch_bytes_per_token"] <= 8 * 16
    assert d["per_predictor"]["s"]["recall"] > d["per_predictor"]["l"]["recall"]
    # its speed is a benchmark figure (bench/prefetch_table.py), not a test: no time bound here


# -- M on a recorded trace -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A tiny store and a trace of it with hidden states (8 experts, top-2, 2 MoE layers)."""
    from hf_models import save_hf_model

    import micro_expert_router as mer
    from micro_expert_router.store import convert

    root = tmp_path_factory.mktemp("m")
    save_hf_model("qwen3moe-plain", root / "ckpt")
    store = convert(root / "ckpt", root / "store", progress=False, log=None).path
    with mer.load(store) as engine:
        list(engine.generate(list(range(1, 9)), 40, temperature=1.5, seed=3, stop_at_eos=False,
                             trace=root / "t.jsonl", trace_hidden=True))  # fmt: skip
    return store, root / "t.jsonl"


def test_store_gates_on_recorded_hidden_states_reproduce_the_routing(recorded):
    from micro_expert_router.sim.prefetch import gates_from_store
    from micro_expert_router.trace import read_trace

    store, path = recorded
    tr = read_trace(path)
    gates = gates_from_store(store)
    assert sorted(gates) == list(tr.layers)
    h = tr.hidden_states()  # [T, L, D]
    same = 0
    for j, layer in enumerate(tr.layers):
        p = gate_probs(np.asarray(h[:, j], np.float32), gates[layer])  # [T, E]
        top = np.sort(np.argsort(-p, axis=1)[:, : tr.top_k], axis=1)
        same += (top == np.sort(tr.experts[:, j], axis=1)).all(axis=1).sum()
    assert same >= 0.95 * tr.num_tokens * tr.num_layers  # hidden states are stored as float16

    r = simulate_prefetch(tr, "lru", 3, predictors="s,l,m", gates=gates)
    first, second = tr.layers
    assert r.scores[first]["m"].candidates == 0  # M speaks for later layers of the same step
    m = r.scores[second]["m"]
    assert m.targets == tr.num_steps and m.candidates > 0
    assert r.exposed <= r.misses
