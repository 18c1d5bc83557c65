"""GGUF in for DeepSeek-V2/V3 (``deepseek2``), GLM-4.5 (``glm4moe``) and GPT-OSS (``gpt-oss``):
tiny random checkpoints written as llama.cpp's converter writes them (``gguf_family_models``),
converted with ``mer convert``, against transformers on the same weights dequantized by gguf-py
(its own GGUF loader does not read these architectures' files).

Block types: ``kquant`` (Q4_K gate/up, Q6_K/Q4_K down by layer, Q5_K/Q8_0 attention, Q4_K
embeddings, Q6_K output), ``legacy`` (Q4_0/Q8_0 experts, F16/BF16 attention, Q8_0 embeddings),
``f32``; GPT-OSS experts are MXFP4 (F32 in ``f32``), with F32 biases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_family_models import write_family_gguf

import micro_expert_router as mer
from micro_expert_router.errors import GGUFError
from micro_expert_router.kernels import get_format
from micro_expert_router.kernels.mxfp4 import to_ggml
from micro_expert_router.store import Store
from micro_expert_router.store.gguf_convert import convert_gguf
from micro_expert_router.store.gguf_file import GGUFFile
from micro_expert_router.store.gguf_model import expert_tensors, model_args

pytest.importorskip("transformers")
pytest.importorskip("gguf")

CASES = [("dsv3", "kquant"), ("dsv2", "legacy"), ("glm", "kquant"), ("glm", "f32"),
         ("gptoss", "legacy"), ("gptoss", "f32")]  # fmt: skip


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def case(request, tmp_path_factory):
    import transformers

    name, plan = request.param
    folder = tmp_path_factory.mktemp(f"{name}-{plan}")
    path, ref = write_family_gguf(name, folder, plan)
    convert_gguf(path, folder / "store", progress=False, log=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (24,), generator=torch.Generator().manual_seed(1)).tolist()
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


def test_greedy_32_tokens_match_transformers(case):
    """32 tokens after an 8-token prompt: past GPT-OSS's window of 8."""
    _, _, _, store, hf, ids = case
    prompt = ids[:8]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32,
                          do_sample=False)[0, len(prompt):].tolist()  # fmt: skip
    with mer.load(store) as engine:
        got = [s.token for s in engine.generate(prompt, max_tokens=32, temperature=0,
                                                stop_at_eos=False)]  # fmt: skip
    assert got == ref


def test_store_expert_bytes_are_the_gguf_bytes(case):
    """Lossless: each expert holds its GGUF blocks (GPT-OSS MXFP4: the same codes and exponents
    in the checkpoint layout, which ``to_ggml`` turns back into the GGUF bytes)."""
    _, plan, path, store_path, _, _ = case
    gf = GGUFFile(path)
    args = model_args(gf)
    store = Store.open(store_path)
    assert not store.verify()
    fmt = get_format(store.manifest["expert_format"])
    d, g, n = args.hidden_size, store.group, args.expert_inter
    for (layer, e), entry in store.experts.items():
        assert entry.offset % 4096 == 0
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            buf = torch.frombuffer(bytearray(f.read(entry.length)), dtype=torch.uint8)
        (tg, og, ng), (tu, ou, nu), (td, od, nd) = expert_tensors(gf, layer, e, args)
        if store.manifest["expert_format"].startswith("mxfp4"):
            r = fmt.unpack_raw(buf, d, n, g)
            gate = to_ggml(r.gu_blocks[0::2], r.gu_scales[0::2]).reshape(-1)
            up = to_ggml(r.gu_blocks[1::2], r.gu_scales[1::2]).reshape(-1)
            down = to_ggml(r.dn_blocks, r.dn_scales).reshape(-1)
        elif store.manifest["expert_format"].startswith("gptoss"):
            gate, up, down = (t.contiguous().view(torch.uint8).reshape(-1)
                              for t in fmt.unpack(buf, d, n, g))  # fmt: skip
        else:
            w = fmt.view(buf, d, g)
            gate = torch.cat(list(w.gate)).reshape(-1)
            up = torch.cat(list(w.up)).reshape(-1)
            down = torch.cat(list(w.down), dim=1).reshape(-1)
        assert gate.numpy().tobytes() == gf.read(tg, og, ng)
        assert up.numpy().tobytes() == gf.read(tu, ou, nu)
        assert down.numpy().tobytes() == gf.read(td, od, nd)


def test_metadata_maps_to_the_family_config(case):
    name, _, path, store, _, _ = case
    a = Store.open(store).args
    if name == "dsv3":
        assert (a.arch, a.attention, a.topk_method, a.scoring) == (
            "DeepseekV3ForCausalLM", "mla", "noaux_tc", "sigmoid")
        assert (a.q_lora_rank, a.kv_lora_rank, a.n_group, a.topk_group) == (64, 64, 4, 2)
        assert a.rope_type == "yarn" and a.moe_layers == (False, True, True)
    elif name == "dsv2":
        assert (a.arch, a.topk_method, a.q_lora_rank) == ("DeepseekV2ForCausalLM",
                                                          "group_limited_greedy", None)
        assert a.shared_expert_inter == 2 * a.expert_inter
    elif name == "glm":
        assert a.n_layers == 3 and GGUFFile(path).get("glm4moe.block_count") == 4
        assert (a.rotary_dim, a.qk_norm, a.qkv_bias) == (32, "head", True)
    else:
        assert a.sliding_layers == (True, False, True, False) and a.sliding_window == 8
        assert a.attn_sinks and a.expert_act == "clamped_swiglu" and not a.yarn_truncate


@pytest.mark.parametrize("old", [False, True], ids=["split-f32", "old-kv_b-q8"])
def test_deepseek2_kv_b_layouts(tmp_path, old):
    """``attn_k_b``/``attn_v_b`` both F32 are rebuilt in F32 element for element; a file from
    before the split holds ``attn_kv_b`` itself (here Q8_0 rows, kept as they are)."""
    import transformers

    path, ref = write_family_gguf("dsv2", tmp_path, "kquant" if old else "f32", old=old)
    names = GGUFFile(path).tensors
    assert ("blk.0.attn_kv_b.weight" in names) == old and ("blk.0.attn_k_b.weight" in names) != old
    convert_gguf(path, tmp_path / "store", progress=False, log=None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ref).eval()
    hf.generation_config.eos_token_id = None
    ids = list(range(5, 29))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    with mer.load(tmp_path / "store") as engine:
        assert rel_err(engine.logits(ids), want) <= 1e-3
        steps = [s.token for s in engine.generate(ids[:4], max_tokens=8, temperature=0,
                                                  stop_at_eos=False)]  # fmt: skip
    with torch.no_grad():
        assert steps == hf.generate(torch.tensor([ids[:4]]), max_new_tokens=8, do_sample=False,
                                    pad_token_id=0)[0, 4:].tolist()  # fmt: skip


@pytest.mark.parametrize("drop", ["attention.kv_lora_rank", "rope.dimension_count"])
def test_deepseek2_file_missing_a_key_is_a_named_error(tmp_path, drop):
    path, _ = write_family_gguf("dsv2", tmp_path, "f32", drop=drop)
    with pytest.raises(GGUFError, match=f"deepseek2.{drop} is missing"):
        convert_gguf(path, tmp_path / "store", progress=False, log=None)
    assert not (tmp_path / "store").exists()
    if drop == "attention.kv_lora_rank":  # the CLI: the message, no traceback (run_cli checks)
        from hf_models import run_cli

        p = run_cli("convert", path, tmp_path / "store", "--quiet")
        assert p.returncode != 0 and "kv_lora_rank is missing" in p.stderr


@pytest.mark.parametrize("name,drop,msg", [
    ("gptoss", "attention.sliding_window", "gpt-oss.attention.sliding_window is missing"),
    ("glm", "expert_shared_count", "expert_shared_count 1 x expert width"),
])  # fmt: skip
def test_glm_and_gpt_oss_bad_metadata_are_named_errors(tmp_path, name, drop, msg):
    """A GLM file without expert_shared_count reads llama.cpp's default of 1; written as 2 it
    no longer matches the shared experts' rows."""
    if drop == "expert_shared_count":
        path, _ = write_family_gguf(name, tmp_path, "f32", shared=2)
    else:
        path, _ = write_family_gguf(name, tmp_path, "f32", drop=drop)
    with pytest.raises(GGUFError, match=msg.replace("1 x", "2 x")):
        model_args(GGUFFile(path))


def test_cli_convert_and_generate_deepseek2(tmp_path):
    from hf_models import run_cli

    path, _ = write_family_gguf("dsv3", tmp_path, "legacy")
    env = dict(__import__("os").environ, MER_CACHE_DIR=str(tmp_path / "cache"))
    p = run_cli("generate", "--model", path, "--prompt-ids", "3,4,5", "--max-tokens", "4",
                "--temperature", "0", "--json", env=env)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "converting" in p.stderr
    assert len(__import__("json").loads(p.stdout.splitlines()[-1])["tokens"]) == 4
