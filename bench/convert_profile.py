"""Where a q4 conversion spends its CPU: milliseconds of one thread per expert, stage by stage.

Reads ``--experts`` experts of one layer of a HuggingFace folder and runs each stage of the q4
converter on them on one torch thread, timing each with the thread's CPU clock (so a busy machine
inflates the figures less than a wall clock would). Stages, in converter order: read (positional
reads of gate, up, down), check (finite weights), rows (each group's gate+up and down slices as
float32), quantize (scales, zeros and 4-bit codes), int4pack (torch's packed layout), assemble
(the group bytes), xxh3, and the error pass the report runs on a sample of experts (reference
unpack, then float64 norms). One line per expert, then the mean per stage.

  python bench/convert_profile.py /tmp/peers/models/olmoe-like --experts 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from micro_expert_router.checkpoint import Checkpoint
from micro_expert_router.kernels import choose_group, get_format
from micro_expert_router.kernels import quant as q4mod
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.formats import check_dense
from micro_expert_router.kernels.quality import rel_l2
from micro_expert_router.store.format import checksum


def profile_expert(ck: Checkpoint, layer: int, e: int) -> dict[str, float]:
    fmt = get_format("q4")
    a = ck.args
    g = choose_group(fmt, a.expert_inter)
    b = fmt.block_size(a.hidden_size, g)
    sections, per = ref.q4_sections(a.hidden_size, g, b)
    t: dict[str, float] = {}

    def stage(name, fn, *args):
        c = time.thread_time()
        out = fn(*args)
        t[name] = t.get(name, 0.0) + (time.thread_time() - c) * 1e3
        return out

    w = stage("read", lambda: ck.expert(layer, e))
    stage("check", lambda: check_dense("q4", *w, g))
    rows = stage("rows", lambda: list(q4mod._group_rows(*w, g)))
    parts = []
    for gu, dn in rows:
        qg, szg = stage("quantize", fmt.quantize, gu, b)
        qd, szd = stage("quantize", fmt.quantize, dn, b)
        pg = stage("int4pack", q4mod._int4_pack, qg, 2)
        pd = stage("int4pack", q4mod._int4_pack, qd, 2)
        parts.append([pg, szg, pd, szd])
    buf = stage("assemble", lambda: q4mod._assemble(sections, per, parts))
    stage("xxh3", lambda: checksum(buf.numpy()))
    u = stage("error_unpack", lambda: fmt.unpack(buf, a.hidden_size, a.expert_inter, g))
    stage("error_norms", lambda: [rel_l2(x, y) for x, y in zip(w, u, strict=True)])
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("model")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--experts", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ck = Checkpoint(a.model, note=None)
    rows = []
    for e in range(a.experts):
        t = profile_expert(ck, a.layer, e)
        rows.append(t)
        print(json.dumps({"expert": e, **{k: round(v, 1) for k, v in t.items()}}), flush=True)
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    pack = sum(v for k, v in mean.items() if not k.startswith("error"))
    err = mean["error_unpack"] + mean["error_norms"]
    print("mean CPU ms per expert: " + ", ".join(f"{k} {v:.1f}" for k, v in mean.items())
          + f"; conversion {pack:.1f}, error pass {err:.1f} (x{err / pack:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
