"""Converting a HuggingFace checkpoint folder into an expert store.

Streams one tensor (one expert) at a time, so peak memory stays near the largest tensor rather
than the model. Writes into a hidden partial folder, fsyncs every file, renames the folder into
place and only then renames the manifest into place: a conversion killed at any moment leaves no
folder that ``Store.open`` (and so ``load``) accepts. Reports each expert tensor's conversion error
(relative L2 against the checkpoint's float values) in ``conversion_report.json`` and a summary.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint, dense_tensor_shapes
from ..errors import StoreError
from ..kernels import choose_group, get_format
from .dense import choose_dense, write_dense
from .format import (
    ALIGN,
    DENSE_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TOKENIZER_FILES,
    Store,
    checksum,
    fsync_dir,
)

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
EXPERT_FILE = "experts-00000.bin"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors_streaming(
    path: Path,
    specs: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    get: Callable[[str, tuple[int, ...]], torch.Tensor],
) -> None:
    """A safetensors file written one tensor at a time (the header is known up front)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in specs:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {
            "dtype": ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [pos, pos + n],
        }
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            f.write(_tensor_bytes(get(name, shape).to(dtype)))
        f.flush()
        os.fsync(f.fileno())


def _rel_l2(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref = ref.double()
    den = float(torch.linalg.vector_norm(ref))
    return float(torch.linalg.vector_norm(got.double() - ref)) / den if den else 0.0


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                leave=False)  # fmt: skip


def convert(
    src: str | Path,
    dst: str | Path,
    dtype: str = "f32",
    force: bool = False,
    dense: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> Store:
    """Convert checkpoint folder ``src`` into a store at ``dst`` with experts in ``dtype`` and
    dense weights in ``dense`` (``store.dense.DENSE_CHOICES``; default: ``DEFAULT_DENSE``)."""
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    fmt = get_format(dtype)
    dense = choose_dense(dense, dtype)
    ckpt = Checkpoint(src)
    args = ckpt.args
    if dst.exists() and not force:
        raise StoreError(f"{dst}: already exists; choose another destination or pass --force "
                         "to replace it")  # fmt: skip
    group = choose_group(fmt, args.expert_inter)
    layout = fmt.layout_tag() if hasattr(fmt, "layout_tag") else fmt.name
    dense_dtype = torch.float32 if dtype == "f32" else torch.bfloat16
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        specs = list(dense_tensor_shapes(args))
        dense_entry, dense_errors = write_dense(tmp / DENSE_FILE, args, specs, ckpt.get, dense,
                                                dense_dtype)  # fmt: skip
        keys = [(layer, e) for layer in range(args.n_layers) if args.moe_layers[layer]
                for e in range(args.n_experts)]  # fmt: skip
        per_expert = (args.expert_inter // group) * fmt.group_nbytes(args.hidden_size, group)
        entries, errors = [], []
        bar = _progress(per_expert * len(keys), f"converting experts to {dtype}", progress)
        with open(tmp / EXPERT_FILE, "wb") as f, bar:
            for layer, e in keys:
                gate, up, down = ckpt.expert(layer, e)
                packed = fmt.pack(gate, up, down, group)
                data = packed.numpy().tobytes()
                if len(data) != per_expert:
                    raise StoreError(f"format {dtype} packed expert ({layer}, {e}) into "
                                     f"{len(data)} bytes, expected {per_expert}")  # fmt: skip
                offset = f.tell()
                f.write(data)
                f.write(b"\0" * (-len(data) % ALIGN))
                entries.append({"layer": layer, "expert": e, "file": 0, "offset": offset,
                                "length": len(data), "xxh3": checksum(data)})  # fmt: skip
                g2, u2, d2 = fmt.unpack(packed, args.hidden_size, args.expert_inter, group)
                errors.append({"layer": layer, "expert": e,
                               "gate": _rel_l2(gate, g2), "up": _rel_l2(up, u2),
                               "down": _rel_l2(down, d2)})  # fmt: skip
                bar.update(len(data))
            f.flush()
            os.fsync(f.fileno())
        copied = []
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
        report = _error_summary(errors)
        (tmp / "conversion_report.json").write_text(
            json.dumps({"expert_format": dtype, "summary": report, "experts": errors,
                        "dense_format": dense, "dense": dense_errors}, indent=1)  # fmt: skip
        )
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "model": args.to_dict(),
            "expert_format": fmt.name, "layout": layout, "group": group,
            "dense": {"file": DENSE_FILE, **dense_entry},
            "expert_files": [EXPERT_FILE], "experts": entries,
            "source": str(src.resolve()), "torch_version": torch.__version__,
        }  # fmt: skip
        with open(tmp / "manifest.json.partial", "w") as mf:
            json.dump(manifest, mf, indent=1)
            mf.flush()
            os.fsync(mf.fileno())
        fsync_dir(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
        os.rename(dst / "manifest.json.partial", dst / "manifest.json")
        fsync_dir(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    store = Store.open(dst)
    if log is not None:
        s = store.summary()
        log(
            f"wrote {dst}: {s['architecture']}, {len(entries)} experts x "
            f"{s['expert_bytes'] / 1e6:.2f} MB ({dtype}, {s['groups_per_expert']} groups of "
            f"{group} neurons) = {s['total_expert_bytes'] / 1e6:.1f} MB in {EXPERT_FILE}; dense "
            f"{s['dense_bytes'] / 1e6:.1f} MB ({dense}); tokenizer files: "
            f"{', '.join(copied) or 'none'}; {time.perf_counter() - t0:.1f} s"
        )
        log(
            "conversion error (relative L2 vs checkpoint), mean / max over experts: "
            + "; ".join(f"{k} {v['mean']:.2e} / {v['max']:.2e}" for k, v in report.items())
        )
        if dense_errors:
            vals = list(dense_errors.values())
            log(f"dense {dense}: {len(vals)} matrices quantized, relative L2 error mean "
                f"{sum(vals) / len(vals):.2e} / max {max(vals):.2e}")  # fmt: skip
    return store


def _error_summary(errors: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    errors = list(errors)
    out = {}
    for k in ("gate", "up", "down"):
        vals = [e[k] for e in errors] or [0.0]
        out[k] = {"mean": sum(vals) / len(vals), "max": max(vals)}
    return out
