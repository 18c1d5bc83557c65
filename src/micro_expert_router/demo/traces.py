"""Routing traces of the demo model, with hidden states, for predictor and planner work.

The traces are not shipped (the demo model is the project's one binary asset): they are recorded
on demand, deterministically (fixed prompts, seeds and greedy/sampled decoding), into a folder
(default: the demo store's cache directory), and reused when present. One trace per prompt, each
a ``mer-trace`` file with a ``.hidden.npy`` side file (docs/trace-format.md).
"""

from __future__ import annotations

from pathlib import Path

# Varied prompts: fortune-cookie style openings, a question, a list, dialogue, a proverb.
PROMPTS = (
    "The secret of life is",
    "Q: What is the best thing about computers?\nA:",
    "You will meet a tall, dark stranger",
    "Three rules for a happy life: first,",
    '"I never said that," she replied, "',
    "A journey of a thousand miles",
    "Whenever you find yourself on the side of the majority,",
    "It is a truth universally acknowledged",
)
TOKENS_PER_PROMPT = 48
SEED = 1234


def record_demo_traces(out_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """Record (or find) the demo traces; returns their paths."""
    from ..engine import load
    from ..paths import cache_dir
    from .store import demo_store_path

    store = demo_store_path()
    out = Path(out_dir) if out_dir is not None else cache_dir() / f"{store.name}-traces"
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"demo-{i:02d}.jsonl" for i in range(len(PROMPTS))]
    if not force and all(p.is_file() and p.with_name(p.name + ".hidden.npy").is_file()
                         for p in paths):  # fmt: skip
        return paths
    with load(store) as engine:
        for i, (prompt, path) in enumerate(zip(PROMPTS, paths, strict=True)):
            temperature = 0.0 if i % 2 == 0 else 0.8
            for _ in engine.generate(prompt, TOKENS_PER_PROMPT, temperature=temperature,
                                     seed=SEED + i, trace=path, trace_hidden=True):  # fmt: skip
                pass
    return paths
