"""Bad input gives a clear error naming the file and the problem, and the CLI never shows a
traceback: unsupported architecture, missing config.json, missing tensor, shape mismatch,
truncated weights, malformed JSON."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_models import run_cli, save_hf_model
from safetensors.torch import load_file, save_file

import micro_expert_router as mer
from micro_expert_router.cli import main
from micro_expert_router.config import EngineConfig
from micro_expert_router.errors import CheckpointError, ConfigError
from micro_expert_router.sampling import sample


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    save_hf_model("mixtral", folder)
    return folder


def copy(good, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(good, dst)
    return dst


def test_unsupported_architecture_lists_supported(good, tmp_path):
    m = copy(good, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported architecture LlamaForCausalLM.*Mixtral"):
        mer.load(m)
    p = run_cli("generate", "--model", m, "--prompt-ids", "1,2")
    assert p.returncode != 0 and "config.json" in p.stderr and "Qwen3MoeForCausalLM" in p.stderr


def test_missing_config(good, tmp_path):
    m = copy(good, tmp_path)
    (m / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json not found"):
        mer.load(m)
    p = run_cli("generate", "--model", m, "--prompt-ids", "1")
    assert p.returncode != 0 and "config.json not found" in p.stderr


def test_malformed_config_json(good, tmp_path):
    m = copy(good, tmp_path)
    (m / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        mer.load(m)


def test_missing_config_key(good, tmp_path):
    m = copy(good, tmp_path)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["num_local_experts"]
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_local_experts"):
        mer.load(m)


def test_missing_tensor_named(good, tmp_path):
    m = copy(good, tmp_path)
    sd = load_file(m / "model.safetensors")
    del sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.3\.w2\.weight is missing"):
        mer.load(m)
    p = run_cli("generate", "--model", m, "--prompt-ids", "1")
    assert p.returncode != 0 and "experts.3.w2.weight is missing" in p.stderr


def test_shape_mismatch_named(good, tmp_path):
    m = copy(good, tmp_path)
    sd = load_file(m / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"][:8]
    save_file(sd, m / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .*q_proj.weight has "
                       r"shape \[8, 64\], expected \[64, 64\]"):  # fmt: skip
        mer.load(m)
    p = run_cli("generate", "--model", m, "--prompt-ids", "1")
    assert p.returncode != 0 and "q_proj.weight has shape" in p.stderr


def test_truncated_weights_named(good, tmp_path):
    m = copy(good, tmp_path)
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* \(truncated"):
        mer.load(m)


def test_sharded_checkpoint_with_index(tmp_path):
    hf = save_hf_model("qwen2moe", tmp_path / "ref")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = mer.load(tmp_path / "ref").logits([1, 2, 3, 4])
    b = mer.load(tmp_path / "sharded").logits([1, 2, 3, 4])
    assert (a == b).all()


def test_missing_shard_named(tmp_path):
    hf = save_hf_model("qwen3moe-plain", tmp_path / "ref")
    hf.save_pretrained(tmp_path / "s", max_shard_size="50KB")
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard named by .* is missing"):
        mer.load(tmp_path / "s")


def test_bad_prompt_ids_and_options(good):
    engine = mer.load(good)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        engine.logits([1, 10_000])
    with pytest.raises(ConfigError, match="unknown engine options"):
        mer.load(good, cache_mb=3)
    with pytest.raises(ConfigError, match="dtype"):
        mer.load(good, dtype="float16")
    p = run_cli("generate", "--model", good, "--prompt-ids", "1,x")
    assert p.returncode != 0 and "comma-separated integers" in p.stderr
    p = run_cli("generate", "--model", good, "--prompt", "hello")
    assert p.returncode != 0 and "no tokenizer.json" in p.stderr


def test_not_a_folder(tmp_path):
    p = run_cli("generate", "--model", tmp_path / "nope", "--prompt-ids", "1")
    assert p.returncode != 0 and "no such model folder" in p.stderr


def test_cli_json_output(good):
    p = run_cli("generate", "--model", good, "--prompt-ids", "1,2,3", "--max-tokens", "4",
                "--temperature", "0", "--json", "--ignore-eos")  # fmt: skip
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == 4
    for key in ("text", "prefill_tok_s", "decode_tok_s", "hit_rate", "bytes_read", "io_wait_s",
                "compute_s"):  # fmt: skip
        assert key in out
    engine = mer.load(good)
    ref = [s.token for s in engine.generate([1, 2, 3], 4, temperature=0, stop_at_eos=False)]
    assert out["tokens"] == ref


def test_cache_options_on_a_checkpoint_folder_are_refused(good):
    with pytest.raises(ConfigError, match="needs an expert store"):
        mer.load(good, cache_bytes=1000)
    p = run_cli("generate", "--model", good, "--prompt-ids", "1", "--split", "0.5")
    assert p.returncode != 0 and "mer convert" in p.stderr


@pytest.mark.parametrize("option", [
    ["--plan", "plan.json"], ["--policy", "lfu"], ["--policy", "lru"], ["--io-threads", "2"],
    ["--verify"], ["--prefetch", "s"],
])  # fmt: skip
def test_store_options_on_a_checkpoint_folder_are_named_errors(good, capsys, option):
    code = main(["generate", "--model", str(good), "--prompt-ids", "1", "--max-tokens", "1",
                 *option])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    name = option[0].removeprefix("--").replace("-", "_")
    assert f"so {name} does not apply" in err and "mer convert" in err


@pytest.mark.parametrize(("option", "words"), [
    (["--temperature", "-0.5"], "temperature must be a number >= 0"),
    (["--temperature", "nan"], "temperature must be a number >= 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "-1"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be an integer >= 0"),
    (["--io-threads", "0"], "io_threads must be a positive integer"),
    (["--io-threads", "-3"], "io_threads must be a positive integer"),
    (["--io-chunk-kib", "6"], "io_chunk_kib must be a multiple of 4"),
    (["--io-chunk-kib", "0"], "io_chunk_kib must be a positive integer"),
    (["--threads", "0"], "threads must be a positive integer"),
])  # fmt: skip
def test_bad_values_are_named_errors(good, capsys, option, words):
    code = main(["generate", "--model", str(good), "--prompt-ids", "1", "--max-tokens", "1",
                 *option])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and words in err, err


def test_the_python_api_checks_the_same_values(good):
    with pytest.raises(ConfigError, match="io_threads"):
        EngineConfig(io_threads=0)
    with pytest.raises(ConfigError, match="policy, io_threads, verify do not apply"):
        mer.load(good, policy="lru", io_threads=4, verify=True)
    engine = mer.load(good)
    for kw, words in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                      ({"top_p": 1.01}, "top_p"), ({"top_k": -2}, "top_k")]:  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            next(engine.generate([1, 2], 2, **kw))
        with pytest.raises(ConfigError, match=words):
            sample(torch.zeros(4), **kw)
    # the edges stay valid: greedy, top-p 1 and top-k 0 are "off"
    steps = list(engine.generate([1, 2], 2, temperature=0.0, top_p=1.0, top_k=0))
    assert len(steps) == 2
