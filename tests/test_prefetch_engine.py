"""The engine's prefetch mechanism: non-evicting, bit-exact, and leak-free."""

from __future__ import annotations

import gc

import pytest
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.errors import ConfigError
from micro_expert_router.store import convert
from micro_expert_router.trace import read_trace


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pf")
    save_hf_model("mixtral", root / "ckpt")
    return convert(root / "ckpt", root / "store", progress=False, log=None).path


def oracle(engine, trace_path):
    """Prefetch, at each layer's routing, the next MoE layer's experts from a recorded run."""
    tr = read_trace(trace_path)
    layers = list(tr.layers)
    state = {"step": -1}
    steps = {}
    for t in range(tr.num_tokens):
        steps.setdefault(int(tr.step[t]), []).append(t)

    def on_route(r):
        if r.layer == layers[0]:
            state["step"] += 1
        j = layers.index(r.layer)
        if j + 1 < len(layers):
            nxt = layers[j + 1]
            toks = steps[state["step"]]
            want = sorted({int(e) for t in toks for e in tr.experts[t, j + 1]})
            engine.provider.prefetch([(nxt, e) for e in want])

    return on_route


def test_oracle_prefetch_turns_misses_into_prefetch_hits(store, tmp_path):
    ids = list(range(3, 20))
    trace = tmp_path / "t.jsonl"
    with mer.load(store, cache_bytes=0) as plain:
        ref = list(plain.generate(ids, 12, temperature=0, stop_at_eos=False, trace=trace))
        assert plain.provider.prefetch([(1, 0)]) == 0  # no prefetch slots: nothing starts
    with mer.load(store, cache_bytes=0, prefetch_slots=12) as engine:
        engine.model.on_route.append(oracle(engine, trace))
        got = list(engine.generate(ids, 12, temperature=0, stop_at_eos=False))
        p = engine.provider
        assert [s.token for s in got] == [s.token for s in ref]
        misses = sum(s.misses for s in got)
        # every miss outside the first MoE layer (which nothing predicts) was prefetched
        first = sum(len({int(e) for t in toks for e in read_trace(trace).experts[t, 0]})
                    for toks in _steps(read_trace(trace)))  # fmt: skip
        assert sum(s.prefetch_hits for s in got) == misses - first
        assert p.stats.prefetch_wasted == 0
        assert p.cache.used_bytes == 0  # budget 0: prefetch never made anything resident


def _steps(tr):
    steps = {}
    for t in range(tr.num_tokens):
        steps.setdefault(int(tr.step[t]), []).append(t)
    return [steps[k] for k in sorted(steps)]


def test_abandoned_generation_with_prefetches_in_flight_returns_every_slot(store, tmp_path):
    trace = tmp_path / "t.jsonl"
    ids = list(range(3, 20))
    with mer.load(store) as plain:
        list(plain.generate(ids, 20, temperature=0, stop_at_eos=False, trace=trace))
        slot = plain.provider.slot_bytes
    with mer.load(store, cache_bytes=2 * slot, prefetch_slots=8) as engine:
        prov = engine.provider
        engine.model.on_route.append(oracle(engine, trace))
        gen = engine.generate(ids, 20, temperature=0, stop_at_eos=False)
        for _ in range(3):
            next(gen)
        del gen
        gc.collect()
        assert prov.pool.free_count == prov.pool.total - len(prov.cache) - len(prov.staged)
    assert prov.pool.free_count == prov.pool.total  # close() dropped staged prefetches too


@pytest.mark.parametrize("spec", ["s", "l", "m", "s,l,m"])
def test_predictor_driven_prefetch_is_bit_exact_and_leaves_residency_alone(store, spec):
    ids = list(range(3, 20))
    with mer.load(store) as probe:
        slot = probe.provider.slot_bytes
    runs = {}
    for pf in ("off", spec):
        with mer.load(store, cache_bytes=4 * slot, prefetch=pf) as engine:
            steps = list(engine.generate(ids, 40, temperature=1.0, seed=2, stop_at_eos=False))
            p = engine.provider
            runs[pf] = ([s.token for s in steps], [(s.hits, s.misses) for s in steps],
                        sum(s.prefetch_hits for s in steps), p.stats.prefetch_issued)  # fmt: skip
            assert p.pool.free_count == p.pool.total - len(p.cache) - len(p.staged)
    off, on = runs["off"], runs[spec]
    assert on[0] == off[0]  # same tokens
    assert on[1] == off[1]  # prefetch never changes what is resident: same hits and misses
    assert off[2] == 0 and on[3] > 0 and on[2] <= on[3]


def test_prefetch_on_a_checkpoint_folder_is_refused(tmp_path):
    save_hf_model("olmoe", tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="needs an expert store"):
        mer.load(tmp_path / "ckpt", prefetch="s,l")


def _prefetcher(engine):
    from micro_expert_router.prefetcher import Prefetcher

    (pf,) = [cb for cb in engine.model.on_route if isinstance(cb, Prefetcher)]
    return pf


def test_prefetcher_stands_down_when_it_does_not_pay_and_probes_again(store):
    """Every expert stays cached, so no prefetch can ever save a read: after one window the
    prefetcher pauses (its own cost is all it adds), and after the pause it tries again."""
    from micro_expert_router.prefetcher import PAY_WINDOW

    with mer.load(store, cache_bytes=None, prefetch="s,l,m") as engine:
        pf = _prefetcher(engine)
        layers = len(pf.layers)
        tokens = PAY_WINDOW // layers + 2  # one full window and a little more
        list(engine.generate(list(range(3, 9)), tokens, temperature=0, stop_at_eos=False))
        assert pf.pauses == 1 and pf.paused > 0 and pf.backoff == 2
        list(engine.generate(list(range(3, 9)), pf.paused // layers + 2, temperature=0,
                             stop_at_eos=False))  # fmt: skip
        assert pf.paused == 0 and pf._calls > 0  # probing again


def test_prefetcher_keeps_going_when_its_hits_save_more_than_it_costs(store):
    with mer.load(store, cache_bytes=0, prefetch="s,l,m") as engine:
        pf = _prefetcher(engine)
        p = engine.provider
        bw = p.reader.stats.busy_bps or 1e9
        pf._cost_s = 0.5 * p.store.expert_bytes / bw  # half of one read's time
        p.stats.prefetch_hits = pf._hits0 + 1  # one hit saved a whole read
        pf._judge()
        assert pf.paused == 0 and pf.pauses == 0
        pf._cost_s = 2.0 * p.store.expert_bytes / bw
        pf._hits0 = p.stats.prefetch_hits - 1
        pf._judge()
        assert pf.paused > 0 and pf.pauses == 1
