"""The docs state what the code does: figures and constants the text quotes are checked against
the code they describe, so a change to one without the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

from micro_expert_router import engine, streaming
from micro_expert_router.cache import POLICIES
from micro_expert_router.config import EngineConfig
from micro_expert_router.kernels import FORMATS

ROOT = Path(__file__).resolve().parents[1]


def doc(name: str) -> str:
    return " ".join((ROOT / "docs" / name).read_text().split())  # line breaks as spaces


def test_store_md_states_each_formats_group_multiple():
    m = re.search(r"`group_multiple` \(([^)]*)\)", doc("store.md"))
    assert m, "store.md no longer states the group multiples"
    stated = {}
    for part in m.group(1).split(", "):
        n, names = part.split(" for ")
        for name in names.replace(" and ", ",").split(","):
            stated[name.strip()] = int(n)
    assert stated == {name: fmt.group_multiple for name, fmt in FORMATS.items()}


def test_slot_size_text_matches_the_provider(tmp_path):
    """Slots are the extent rounded up to 4096, nothing added (docstring and simulator.md)."""
    for text in (streaming.__doc__, doc("simulator.md"), doc("streaming.md")):
        assert "plus 4096" not in " ".join(text.split())
    from hf_models import save_hf_model

    from micro_expert_router.io import align_up
    from micro_expert_router.store import convert

    save_hf_model("qwen3moe-plain", tmp_path / "ckpt")
    store = convert(tmp_path / "ckpt", tmp_path / "store", progress=False, log=None)
    import micro_expert_router as mer

    with mer.load(store.path, cache_bytes=0) as e:
        assert e.provider.slot_bytes == align_up(store.expert_bytes)


def test_streaming_md_names_every_policy():
    m = re.search(r"`POLICIES` maps names to classes:([^(]*)", doc("streaming.md"))
    assert m
    assert set(re.findall(r"`(\w+)`", m.group(1))) == set(POLICIES)


def test_load_docstring_names_every_option():
    text = engine.load.__doc__
    missing = [f for f in EngineConfig.__dataclass_fields__ if f"``{f}``" not in text]
    assert not missing, f"load() docstring omits {missing}"


def test_no_server_is_claimed_until_one_exists():
    pkg = ROOT / "src" / "micro_expert_router"
    if (pkg / "server.py").exists() or (pkg / "server").is_dir():
        return
    for path in pkg.rglob("*.py"):
        assert "the server" not in path.read_text(), f"{path} mentions a server"


def test_quantization_md_claims_no_repack_on_open(tmp_path):
    """The doc says a store in another q4 layout is refused with the reconvert command, and
    that nothing repacks it: both checked."""
    import json

    import pytest
    from hf_models import save_hf_model

    from micro_expert_router.errors import StoreError
    from micro_expert_router.kernels.quant import int4_layout
    from micro_expert_router.store import Store, convert

    text = doc("quantization.md")
    assert "There is no repack on open and no `mer repack` command" in text
    assert not (ROOT / "src/micro_expert_router/commands/repack.py").exists()
    save_hf_model("mixtral", tmp_path / "ckpt")  # D = 64, I = 96: q4 groups of 32
    store = convert(tmp_path / "ckpt", tmp_path / "store", dtype="q4", progress=False, log=None)
    path = store.path / "manifest.json"
    manifest = json.loads(path.read_text())
    other = "pair32" if int4_layout() != "pair32" else "n32"
    manifest["layout"] = f"q4:v1:int4pack-cpu:{other}"
    path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="mer convert .* --dtype q4 --force"):
        Store.open(store.path)
