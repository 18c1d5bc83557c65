"""Fuzzing the GGUF reader with hypothesis: a valid tiny GGUF file (tests/gguf_models.py) with
random bytes overwritten in its header, metadata and tensor table, or cut at a random length, is
either read (``GGUFFile`` and the model arguments derived from its metadata) or refused with one
of the project's named errors (``MERError``), never another exception type.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from gguf_models import write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micro_expert_router.errors import MERError
from micro_expert_router.store.gguf_file import GGUFFile
from micro_expert_router.store.gguf_model import model_args

EXAMPLES = {"header_bytes": 150, "truncated": 60}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> tuple[bytes, int]:
    """The bytes of a valid GGUF, and where its tensor data begins (the parsed part ends)."""
    folder = tmp_path_factory.mktemp("gguf-fuzz")
    path, _ = write_gguf("qwen3moe-k", folder, "legacy")
    gf = GGUFFile(path)
    model_args(gf)  # the unmutated file reads
    start = min(t.offset for t in gf.tensors.values())
    return Path(path).read_bytes(), start


def parse(data: bytes, folder: Path) -> None:
    path = folder / "model.gguf"
    path.write_bytes(data)
    try:
        model_args(GGUFFile(path))
    except MERError as e:
        assert str(e)  # a named error with a message
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()


@settings(max_examples=EXAMPLES["header_bytes"], deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(0, 255)), min_size=1,
                      max_size=6))  # fmt: skip
def test_mutated_header_bytes_give_named_errors(valid, tmp_path, edits):
    data, start = valid
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % start] = value  # inside the header, metadata and tensor table
    parse(bytes(buf), tmp_path)


@settings(max_examples=EXAMPLES["truncated"], deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(frac=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_give_named_errors(valid, tmp_path, frac):
    data, _ = valid
    parse(data[: int(len(data) * frac)], tmp_path)
