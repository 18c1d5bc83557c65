"""Golden greedy decode on the bundled demo model, resident and streamed from its store."""

from __future__ import annotations

import subprocess
import sys

import pytest

import micro_expert_router as mer
from micro_expert_router.demo import demo_model_path
from micro_expert_router.demo.store import default_cache_bytes, demo_store_path

PROMPT = "The secret of life is"
PROMPT_IDS = [0, 317, 1040, 1255, 289, 678, 302]
# Recorded from the committed demo model (float32, greedy); generation stops at id 0 (EOS).
GOLDEN = [259, 629, 572, 282, 308, 1157, 14, 294, 198, 290, 339, 346, 1165, 77, 2217, 484, 0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("MER_CACHE_DIR", str(tmp_path_factory.mktemp("mercache")))
    return demo_store_path()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_golden_greedy_decode_resident():
    engine = mer.load(demo_model_path())
    assert engine.encode(PROMPT) == PROMPT_IDS
    steps = list(engine.generate(PROMPT, max_tokens=40, temperature=0))
    assert [s.token for s in steps] == GOLDEN
    assert steps[-1].finish_reason == "stop"


def test_golden_greedy_decode_streamed_under_the_default_budget(store):
    budget = default_cache_bytes(store)
    with mer.load(store, cache_bytes=budget) as engine:
        steps = list(engine.generate(PROMPT, max_tokens=40, temperature=0))
        assert [s.token for s in steps] == GOLDEN
        needed = sum(s.experts_needed for s in steps)
        assert 0 < sum(s.hits for s in steps) < needed
        assert sum(s.bytes_read for s in steps) > 0
        assert engine.provider.cache.used_bytes <= budget


def test_mer_generate_default_runs_the_demo(store, tmp_path):
    import os

    env = dict(os.environ, MER_CACHE_DIR=str(store.parent))
    p = subprocess.run([sys.executable, "-m", "micro_expert_router.cli", "generate", "--prompt",
                        PROMPT, "--max-tokens", "24", "--temperature", "0"],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(PROMPT) and len(p.stdout) > len(PROMPT) + 10
    summary = p.stderr.strip().splitlines()[-1]
    assert "hit rate" in summary and "MB read/token" in summary
    rate = float(summary.split("hit rate ")[1].split("%")[0])
    assert 0 < rate < 100
