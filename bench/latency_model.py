"""Latency model vs measured time per output token on a streamed store (issue 7, point 3).

Builds (once) a random-weight Qwen3-MoE checkpoint whose experts total about 1.2 GB, converts it
to a store, records a routing trace, measures the latency profile (`mer plan`'s measurements),
then for several configurations (cache budget x split ratio, and the planner's own plan) runs
decode and compares the measured time per output token with the model's prediction.
Random weights with std-1 embeddings route near-uniformly (DESIGN.md). Prints one line per
configuration and the worst relative error last; writes JSON lines to bench/results/.

    python bench/latency_model.py [--dir DIR] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

import micro_expert_router as mer
from micro_expert_router.plan import Plan, predict
from micro_expert_router.plan.profile import build_profile, make_plan
from micro_expert_router.store import Store, convert

PROMPT = 16  # prompt tokens (ids 5..20)


def build(root: Path) -> Path:
    store = root / "store"
    if (store / "manifest.json").is_file():
        return store
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=1024, moe_intermediate_size=1024, intermediate_size=1024,
        num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
        num_experts=16, num_experts_per_tok=2, vocab_size=1024, norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.model.embed_tokens.weight.data.normal_()
    model.save_pretrained(root / "ckpt")
    del model
    convert(root / "ckpt", store, progress=True)
    return store


def decode_s_per_token(store: Path, tokens: int, **options) -> float:
    with mer.load(store, **options) as engine:
        steps = list(engine.generate(list(range(5, 21)), tokens, temperature=1.0, seed=11,
                                     stop_at_eos=False))  # fmt: skip
    decode = [s.step_s for s in steps[1:]]
    warm = len(decode) // 4  # let the cache fill before timing (the profile skips the same)
    return statistics.mean(decode[warm:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=str(Path(__file__).resolve().parents[1] / ".bench-data"))
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="compute threads for profile and runs alike (1 on a shared 2-core box)",
    )
    args = ap.parse_args()
    root = Path(args.dir) / "latency-model"
    root.mkdir(parents=True, exist_ok=True)
    store = build(root)
    s = Store.open(store)
    trace = root / "trace.jsonl"
    with mer.load(store) as engine:
        list(engine.generate(list(range(5, 21)), args.tokens, temperature=1.0, seed=11,
                             stop_at_eos=False, trace=trace))  # fmt: skip
    # the timed window skips the prompt, the first decode token and a quarter of the rest:
    # replay the trace with the same tokens uncounted
    warmup = PROMPT + 1 + (args.tokens - 1) // 4
    profile = build_profile(store, trace, policy="lru", warmup=warmup, threads=args.threads)
    print(f"profile: disk {profile.bandwidth_bps / 1e9:.2f} GB/s, latency "
          f"{profile.read_latency_s * 1e3:.2f} ms, expert {s.expert_bytes / 1e6:.1f} MB, "
          f"expert compute {profile.layers[0].expert_s * 1e3:.2f} ms, dense "
          f"{profile.layers[0].dense_s * 1e3:.2f} ms")  # fmt: skip
    layers = [i for i in range(s.args.n_layers) if s.args.moe_layers[i]]
    total = s.total_expert_bytes
    configs = []
    for frac in (0.0, 0.25, 0.5):
        for steps in (8, 4):
            if frac == 0.0 and steps == 4:
                continue
            configs.append((f"budget {frac:.0%} theta {steps}/8",
                            Plan.uniform(layers, int(frac * total), steps, 8)))  # fmt: skip
    result, _ = make_plan(profile, s, int(0.25 * total))
    configs.append(("planner, budget 25%", result.plan))
    out = Path(__file__).resolve().parent / "results" / "latency_model.jsonl"
    out.parent.mkdir(exist_ok=True)
    from micro_expert_router.plan.profile import measure_disk

    pred: dict[str, list[float]] = {name: [] for name, _ in configs}
    meas: dict[str, list[float]] = {name: [] for name, _ in configs}
    for r in range(args.rounds):  # configurations interleaved, round after round (ABAB...)
        for name, plan in configs:
            path = root / "plan.json"
            path.write_text(plan.to_json())
            # this shared machine's disk drifts over minutes: measure it right before each run
            bandwidth, latency = measure_disk(s, seed=r)
            prof = replace(profile, bandwidth_bps=bandwidth, read_latency_s=latency)
            p_s = predict(prof, plan).s_per_token
            m_s = decode_s_per_token(store, args.tokens, plan=str(path), policy="lru",
                                     threads=args.threads)  # fmt: skip
            pred[name].append(p_s)
            meas[name].append(m_s)
            print(f"round {r} {name:28s} predicted {p_s * 1e3:8.2f} ms  measured "
                  f"{m_s * 1e3:8.2f} ms  (disk {bandwidth / 1e9:.2f} GB/s)")  # fmt: skip
            with open(out, "a") as f:
                f.write(json.dumps({"time": time.time(), "config": name, "predicted_s": p_s,
                                    "measured_s": m_s, "disk_bps": bandwidth}) + "\n")  # fmt: skip
    errors = []
    for name, _ in configs:
        p_s, m_s = statistics.median(pred[name]), statistics.median(meas[name])
        err = (p_s - m_s) / m_s
        errors.append(abs(err))
        print(
            f"median {name:28s} predicted {p_s * 1e3:8.2f} ms  measured {m_s * 1e3:8.2f} ms "
            f"[{min(meas[name]) * 1e3:.1f}-{max(meas[name]) * 1e3:.1f}]  error {err:+.1%}"
        )
    print(
        f"worst |error| over {len(configs)} configurations: {max(errors):.1%} "
        f"(median {statistics.median(errors):.1%})"
    )


if __name__ == "__main__":
    main()
