"""GGUF in, lossless: tiny random HF checkpoints of every supported family written as GGUF in
every supported block type (``gguf_models.PLANS``), converted with ``mer convert``, and run
against transformers on the same weights dequantized by gguf-py.

Plans: ``kquant`` (Q4_K gate/up, down Q6_K in layer 0 and Q4_K in layer 1 as in Q4_K_M files,
Q5_K/Q6_K attention, Q4_K embeddings, Q6_K output), ``legacy`` (Q4_0, Q8_0, MXFP4 experts; F16
and BF16 attention; Q8_0 embeddings; Q4_0 output; Q4_0 dense MLPs), F32 norms and routers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf_models import write_gguf
from hf_models import run_cli

import micro_expert_router as mer
from micro_expert_router.kernels import get_format
from micro_expert_router.store import Store
from micro_expert_router.store.gguf_convert import convert_gguf
from micro_expert_router.store.gguf_file import GGUFFile
from micro_expert_router.store.gguf_model import expert_tensors, model_args

pytest.importorskip("transformers")
pytest.importorskip("gguf")

CASES = [("qwen3moe-k", "kquant"), ("olmoe-k", "legacy"), ("qwen3moe-k", "legacy"),
         ("olmoe-k", "kquant"), ("qwen2moe-k", "kquant"), ("mixtral-k", "legacy")]  # fmt: skip


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, tmp_path_factory):
    import transformers

    name, plan = request.param
    folder = tmp_path_factory.mktemp(f"{name}-{plan}")
    path, ref = write_gguf(name, folder, plan)
    convert_gguf(path, folder / "store", progress=False, log=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref).eval()
    hf.generation_config.eos_token_id = None  # 32 tokens, never stopped early
    hf.generation_config.pad_token_id = 0
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    return name, plan, path, folder / "store", hf, ids


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_logits_match_transformers_on_dequantized_weights(case):
    _, _, _, store, hf, ids = case
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    with mer.load(store) as engine:
        out = engine.logits(ids)
    assert rel_err(out, ref) <= 1e-3


def test_bfloat16_mode_stays_close(case):
    """bfloat16 mode (int8 activations in the Q4_K/Q6_K decode kernels) against float32."""
    _, _, _, store, _, ids = case
    with mer.load(store) as f32, mer.load(store, dtype="bfloat16") as bf16:
        ref = f32.logits(ids)
        out = bf16.logits(ids)
        steps = [s.token for s in bf16.generate(ids[:4], max_tokens=4, temperature=0,
                                                stop_at_eos=False)]  # fmt: skip
    assert rel_err(out, ref) <= 5e-2 and len(steps) == 4


def test_greedy_32_tokens_match_transformers(case):
    _, _, _, store, hf, ids = case
    prompt = ids[:8]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32,
                          do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
    with mer.load(store) as engine:  # decode steps take the native kernels (T = 1)
        got = [s.token for s in engine.generate(prompt, max_tokens=32, temperature=0,
                                                stop_at_eos=False)]  # fmt: skip
    assert got == ref


def test_store_expert_bytes_are_the_gguf_bytes(case):
    """Lossless: every expert's groups hold exactly the GGUF blocks of its three tensors."""
    _, _, path, store_path, _, _ = case
    gf = GGUFFile(path)
    args = model_args(gf)
    store = Store.open(store_path)
    assert not store.verify()  # checksums
    fmt = get_format(store.manifest["expert_format"])
    d, g = args.hidden_size, store.group
    for (layer, e), entry in store.experts.items():
        assert entry.offset % 4096 == 0
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            buf = torch.frombuffer(bytearray(f.read(entry.length)), dtype=torch.uint8)
        w = fmt.view(buf, d, g)
        (tg, og, ng), (tu, ou, nu), (td, od, nd) = expert_tensors(gf, layer, e, args)
        assert [t.name for t in w.types] == [tg.type_name, tu.type_name, td.type_name]
        gate = torch.cat(list(w.gate)).reshape(-1)  # groups in order = rows in order
        up = torch.cat(list(w.up)).reshape(-1)
        down = torch.cat(list(w.down), dim=1).reshape(-1)  # [D, n x slice] = rows of down
        assert gate.numpy().tobytes() == gf.read(tg, og, ng)
        assert up.numpy().tobytes() == gf.read(tu, ou, nu)
        assert down.numpy().tobytes() == gf.read(td, od, nd)


def test_split_expert_segments_give_the_same_bits(tmp_path):
    """A MoEpic split store over GGUF experts: top cached + bottom streamed == whole."""
    path, _ = write_gguf("qwen3moe-k", tmp_path, "legacy")
    convert_gguf(path, tmp_path / "store", progress=False, log=None)
    ids = list(range(3, 19))
    with mer.load(tmp_path / "store") as whole:
        ref = whole.logits(ids)
    with mer.load(tmp_path / "store", cache_bytes=10**9, split=0.5) as split:
        out = split.logits(ids)
    np.testing.assert_array_equal(out, ref)


def test_split_gguf_file_and_cli_convert_and_generate(tmp_path):
    path, _ = write_gguf("olmoe-k", tmp_path, "kquant", split=3)
    assert path.name == "model-00001-of-00003.gguf"
    assert len(GGUFFile(path).parts) == 3
    env = dict(__import__("os").environ, MER_CACHE_DIR=str(tmp_path / "cache"))
    p = run_cli("convert", path, tmp_path / "store", "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "store" / "conversion_report.json").read_text())
    assert report["lossless"] is True
    p = run_cli("generate", "--model", path, "--prompt-ids", "3,4,5", "--max-tokens", "4",
                "--temperature", "0", "--json", env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "converting" in p.stderr and len(json.loads(p.stdout.splitlines()[-1])["tokens"]) == 4
    p = run_cli("generate", "--model", path, "--prompt-ids", "3,4,5", "--max-tokens", "4",
                "--temperature", "0", "--json", env=env)  # fmt: skip
    assert p.returncode == 0 and "converting" not in p.stderr  # converted once, reused


def test_per_expert_tensors_of_older_mixtral_files(tmp_path):
    import transformers

    path, ref = write_gguf("mixtral-k", tmp_path, "kquant", per_expert=True)
    assert "blk.0.ffn_gate.3.weight" in GGUFFile(path).tensors
    convert_gguf(path, tmp_path / "store", progress=False, log=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref).eval()
    ids = list(range(7, 31))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    with mer.load(tmp_path / "store") as engine:
        assert rel_err(engine.logits(ids), want) <= 1e-3


def test_small_read_batches_give_the_same_store(tmp_path, monkeypatch):
    """Batched reads (a few experts per read, the next batch read ahead, buffers reused once a
    batch is packed) write the same expert bytes as one batch per layer."""
    from micro_expert_router.store import gguf_convert

    path, _ = write_gguf("qwen3moe-k", tmp_path, "legacy")
    convert_gguf(path, tmp_path / "one", progress=False, log=None)
    gf = GGUFFile(path)
    per = max(n for _, _, n in expert_tensors(gf, 0, 0, model_args(gf)))
    monkeypatch.setattr(gguf_convert, "BATCH_BYTES", 3 * per)  # 3 experts per batch
    monkeypatch.setattr(gguf_convert, "BUFFER", 3 * per + 2 * 4096)
    convert_gguf(path, tmp_path / "small", progress=False, log=None)
    a, b = Store.open(tmp_path / "one"), Store.open(tmp_path / "small")
    assert [e["xxh3"] for e in a.manifest["experts"]] == [e["xxh3"] for e in b.manifest["experts"]]
    assert not b.verify()
    name = a.manifest["expert_files"][0]
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()
