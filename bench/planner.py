"""The MoEpic planner's quality against brute force, and its runtime on large instances.

Quality: random instances from the planner test's generator (``tests/test_plan.py``:
``random_instance``, 1-4 layers, Zipf / saturating / S-shaped hit curves, compute/read ratios
0.05-3, per-layer accuracy 0 or uniform), each planned three ways and compared with
``brute_force`` (the optimum on the same grids): the planner, the planner without the pair check
(``pair_reach=0``), and the even-split whole-expert start. Prints one line per seed and the
counts of instances more than 1% above the optimum.

Runtime: ``plan_cache`` on synthetic profiles of 24 and 48 layers, 60 experts, top-4, theta grid
8, 256 quanta; one line per trial, medians last.

    python bench/planner.py [--seeds 7,8,9,10] [--per-seed 220] [--rounds 3] [--layers 24,48]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import numpy as np

from micro_expert_router.plan import LayerProfile, Plan, Profile, brute_force, plan_cache, predict

REPO = Path(__file__).resolve().parent.parent


def test_generator():
    """tests/test_plan.py's instance generator (one definition for the test and this bench)."""
    spec = importlib.util.spec_from_file_location("test_plan", REPO / "tests/test_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.random_instance, mod.random_curve, mod.GRIDS


def quality(seed: int, n: int, gen) -> dict:
    random_instance, _, grids = gen
    rng = np.random.default_rng(seed)
    worst, far = 0.0, {"planner": 0, "no_pair": 0, "even": 0}
    exact = 0
    for _ in range(n):
        L = int(rng.integers(1, 5))
        prof, total = random_instance(rng, L)
        quanta, grid = grids[L]
        best = brute_force(prof, total, theta_grid=grid, quanta=quanta).s_per_token
        got = plan_cache(prof, total, theta_grid=grid, quanta=quanta).s_per_token
        nopair = plan_cache(prof, total, theta_grid=grid, quanta=quanta, pair_reach=0).s_per_token
        q = total // quanta
        even = predict(prof, Plan.uniform(range(L), (quanta // L) * L * q, grid, grid)).s_per_token
        worst = max(worst, got / best - 1)
        exact += got <= best * (1 + 1e-12)
        for name, t in (("planner", got), ("no_pair", nopair), ("even", even)):
            far[name] += t > 1.01 * best
    return dict(seed=seed, instances=n, exact=exact, worst=worst, **{f"over1pct_{k}": v
                                                                    for k, v in far.items()})


def big_profile(rng: np.random.Generator, n_layers: int, curve) -> Profile:
    S, B, k = 20 * 2**20, 2e9, 4
    layers = [LayerProfile(S, k, S / B * rng.uniform(0.1, 3), S / B * rng.uniform(0.3, 3),
                           curve(rng, 60), float(rng.uniform(0, 1))) for _ in range(n_layers)]
    return Profile(tuple(layers), B, 1e-4, 1e-3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="7,8,9,10")
    ap.add_argument("--per-seed", type=int, default=220)
    ap.add_argument("--layers", default="24,48")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench/results/planner.jsonl"))
    args = ap.parse_args()
    gen = test_generator()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out, "a") as log:
        for seed in (int(s) for s in args.seeds.split(",") if s.strip()):
            t0 = time.perf_counter()
            r = quality(seed, args.per_seed, gen)
            rows.append(r)
            print(f"seed {seed}: {r['instances']} instances, exactly optimal {r['exact']}, worst "
                  f"+{r['worst']:.2%}; over 1%: planner {r['over1pct_planner']}, without the "
                  f"pair check {r['over1pct_no_pair']}, even split {r['over1pct_even']} "
                  f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
            log.write(json.dumps(dict(bench="planner-quality", **r)) + "\n")
        times: dict[int, list[float]] = {}
        for r in range(args.rounds):
            for n in (int(x) for x in args.layers.split(",") if x.strip()):
                prof = big_profile(np.random.default_rng(r), n, gen[1])
                total = int(0.3 * n * 60 * prof.layers[0].expert_bytes)
                t0 = time.perf_counter()
                res = plan_cache(prof, total, theta_grid=8, quanta=256)
                dt = time.perf_counter() - t0
                times.setdefault(n, []).append(dt)
                print(f"round {r + 1} {n} layers: {dt:.3f} s, {res.iterations} rounds, "
                      f"{'converged' if res.converged else 'NOT converged'}")  # fmt: skip
                log.write(json.dumps(dict(bench="planner-runtime", layers=n, s=dt)) + "\n")
    total = sum(r["instances"] for r in rows)
    over = sum(r["over1pct_planner"] for r in rows)
    print(f"quality: {total} instances, planner over 1% in {over}, worst "
          f"+{max((r['worst'] for r in rows), default=0):.2%}")  # fmt: skip
    print("runtime medians: " + ", ".join(f"{n} layers {statistics.median(v):.3f} s"
                                          for n, v in times.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
