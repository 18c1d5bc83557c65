"""Bad GGUF input gets a named error, never a traceback: truncated files, a wrong magic, an
unknown version, malformed metadata, a missing part of a split file, a tensor whose size does not
match its shape and type, an unsupported block type (and ``--requantize q8`` for it), an
unsupported architecture."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from hf_models import run_cli

from micro_expert_router.errors import GGUFError
from micro_expert_router.store.gguf_convert import convert_gguf
from micro_expert_router.store.gguf_file import GGUFFile
from micro_expert_router.store.gguf_model import model_args


def _tiny(path, arch="qwen3moe", n_tensors=2, q2k=False):
    """A minimal GGUF: F32 tensors of 4 x 64 (``t1`` in Q2_K, 4 x 256, with ``q2k``)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    rng = np.random.default_rng(0)
    for i in range(n_tensors):
        if q2k and i == 1:
            q = rng.integers(0, 256, (4, 84), dtype=np.uint8)
            q[:, 80:84] = 0  # d = dmin = 0: finite values
            w.add_tensor("t1.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q2_K)
        else:
            w.add_tensor(f"t{i}.weight", rng.standard_normal((4, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_wrong_magic_and_version(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)
    p.write_bytes(b"GGUF" + struct.pack("<I", 99) + bytes(100))
    with pytest.raises(GGUFError, match="version 99"):
        GGUFFile(p)
    p.write_bytes(b"GGU")
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(p)
    with pytest.raises(GGUFError, match="no such GGUF file"):
        GGUFFile(tmp_path / "missing.gguf")


@pytest.mark.parametrize("cut", [40, 200, -8])
def test_truncated_file(tmp_path, cut):
    p = _tiny(tmp_path / "x.gguf")
    data = p.read_bytes()
    p.write_bytes(data[:cut])
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(p)


def test_malformed_metadata(tmp_path):
    """An unknown value type, bad UTF-8 and a bad alignment are named errors too."""
    p = _tiny(tmp_path / "x.gguf")
    data = p.read_bytes()
    key = b"general.architecture"
    at = data.index(key) + len(key)  # the key's u32 value type (8: string) follows it
    assert struct.unpack_from("<I", data, at)[0] == 8
    bad = bytearray(data)
    struct.pack_into("<I", bad, at, 77)
    p.write_bytes(bytes(bad))
    with pytest.raises(GGUFError, match="malformed GGUF metadata .*value type 77"):
        GGUFFile(p)
    bad = bytearray(data)
    bad[at + 4 + 8] = 0xFF  # the first byte of the architecture string
    p.write_bytes(bytes(bad))
    with pytest.raises(GGUFError, match="not UTF-8"):
        GGUFFile(p)
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), arch="qwen3moe")
    w.add_uint32("general.alignment", 24)
    w.add_tensor("t0.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="alignment 24 is not a power of two"):
        GGUFFile(tmp_path / "a.gguf")


def test_tensor_size_does_not_match_shape_and_type(tmp_path):
    p = _tiny(tmp_path / "x.gguf")
    data = bytearray(p.read_bytes())
    # the first tensor's ne[1] (4 rows) becomes 5: its bytes now overlap the next tensor
    at = data.index(b"t0.weight") + len(b"t0.weight") + 4 + 8
    assert struct.unpack_from("<Q", data, at)[0] == 4
    struct.pack_into("<Q", data, at, 5)
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="t0.weight .* by its shape and type"):
        GGUFFile(p)


def test_missing_part_of_a_split_file(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="qwen3moe", split_max_tensors=1)
    for i in range(3):
        w.add_tensor(f"t{i}.weight", np.zeros((4, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    first = tmp_path / "m-00001-of-00003.gguf"
    assert len(GGUFFile(first).parts) == 3
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    with pytest.raises(GGUFError, match="m-00002-of-00003.gguf are missing"):
        GGUFFile(first)


def test_unsupported_block_type_names_tensor_type_and_supported(tmp_path):
    p = _tiny(tmp_path / "x.gguf", q2k=True)
    t = GGUFFile(p).tensor("t1.weight")
    with pytest.raises(GGUFError, match=r"t1.weight has GGML type Q2_K.*Q4_K.*MXFP4.*requantize"):
        t.supported()


def test_unsupported_architectures(tmp_path):
    for arch, msg in (("deepseek", "DeepSeek-MoE v1"), ("glm4", "dense GLM-4"),
                      ("falcon", "not supported")):  # fmt: skip
        with pytest.raises(GGUFError, match=msg):
            model_args(GGUFFile(_tiny(tmp_path / f"{arch}.gguf", arch=arch)))
    p = _tiny(tmp_path / "dense.gguf", arch="llama")
    with pytest.raises(GGUFError, match="dense"):
        model_args(GGUFFile(p))


def test_cli_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<I", 7) + bytes(64))
    p = run_cli("convert", bad, tmp_path / "store", "--quiet")
    assert p.returncode != 0 and "version 7" in p.stderr
    p = run_cli("generate", "--model", tmp_path / "nope-00001-of-00002.gguf")
    assert p.returncode != 0 and "missing" in p.stderr


def test_requantize_q8_converts_an_unsupported_type_with_its_loss(tmp_path):
    from gguf_models import write_gguf

    path, _ = write_gguf("olmoe-k", tmp_path, "q2up")  # up experts in Q2_K
    with pytest.raises(GGUFError, match="blk.0.ffn_up_exps.weight has GGML type Q2_K"):
        convert_gguf(path, tmp_path / "s1", progress=False, log=None)
    assert not (tmp_path / "s1").exists()
    logs = []
    store = convert_gguf(path, tmp_path / "s2", progress=False, log=logs.append,
                         requantize="q8")  # fmt: skip
    assert "q8_0" in store.manifest["expert_format"]
    assert any("Q2_K -> Q8_0" in m and "lossy" in m for m in logs)


def test_block_count_beyond_the_tensor_table(tmp_path):
    """A corrupt layer count (fuzzing found 2^30) is a named error at once, not a loop over
    every claimed layer."""
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch="qwen3moe")
    w.add_block_count(1 << 30)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="block_count says 1073741824 layers.*blk.0 to blk.0"):
        model_args(GGUFFile(tmp_path / "m.gguf"))
