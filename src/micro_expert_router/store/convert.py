"""Converting a HuggingFace checkpoint folder into an expert store.

Streams one tensor at a time for the dense weights, and a few experts at a time for the experts
(``experts.py`` packs them on all cores and writes them in order), so peak memory stays near the
largest tensor rather than the model. Writes into a hidden partial folder, fsyncs every file,
renames the folder into place and only then renames the manifest into place: a conversion killed
at any moment leaves no folder that ``Store.open`` (and so ``load``) accepts. Reports the
conversion error (relative L2 against the checkpoint's float values, ``kernels/quality.py``) of a
sample of experts, every N-th in store order, in ``conversion_report.json`` and a summary that
states the sample.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, dense_tensor_shapes
from ..errors import StoreError
from ..kernels import choose_group, get_format
from ..kernels.quality import QuantError, error_stats, error_summary
from .dense import choose_dense, write_dense
from .experts import default_workers, fsync_file, sample_every, start_writeback, write_experts
from .format import (
    DENSE_FILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TOKENIZER_FILES,
    Store,
    place_store,
)

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
EXPERT_FILE = "experts-00000.bin"


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
    workers: int | None = None,
    error_every: int | None = None,
) -> Store:
    """Convert checkpoint folder ``src`` into a store at ``dst`` with experts in ``dtype`` and
    dense weights in ``dense`` (``store.dense.DENSE_CHOICES``; default: ``DEFAULT_DENSE``).

    ``workers`` packing threads (default: one per core, at most four; the output does not
    depend on it); the error report measures every ``error_every``-th expert (default: about
    32 experts spread over the layers; 1 measures all).
    """
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    fmt = get_format(dtype)
    dense = choose_dense(dense, dtype)
    ckpt = Checkpoint(src, note=log)
    args = ckpt.args
    read = None  # Checkpoint.expert
    if args.expert_act == "clamped_swiglu":  # GPT-OSS: expert biases, maybe MXFP4 blocks
        from ..models.gpt_oss import store_format

        try:
            fmt, read = store_format(ckpt, dtype, log)
        except BaseException:
            ckpt.close()
            raise
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
        start_writeback(tmp / DENSE_FILE)  # on disk while the experts are packed; fsync below
        keys = [(layer, e) for layer in range(args.n_layers) if args.moe_layers[layer]
                for e in range(args.n_experts)]  # fmt: skip
        per_expert = (args.expert_inter // group) * fmt.group_nbytes(args.hidden_size, group)
        every = error_every or sample_every(len(keys))
        bar = _progress(per_expert * len(keys), f"converting experts to {dtype}", progress)
        with open(tmp / EXPERT_FILE, "wb") as f, bar:
            entries, errors = write_experts(
                ckpt, fmt, group, keys, f, workers=workers or default_workers(),
                error_every=every, progress=bar.update, read=read,
            )  # fmt: skip
            f.flush()
            os.fsync(f.fileno())
        fsync_file(tmp / DENSE_FILE)
        copied = []
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
                copied.append(name)
        sampled = {f"layer {q['layer']} expert {q['expert']}":
                   QuantError(q["gate"], q["up"], q["down"]) for q in errors}  # fmt: skip
        report = error_stats(sampled)
        (tmp / "conversion_report.json").write_text(
            json.dumps(
                {
                    "expert_format": dtype,
                    "summary": report,
                    "sampled_every": every,
                    "sampled": len(errors),
                    "of": len(keys),
                    "experts": errors,
                    "dense_format": dense,
                    "dense": dense_errors,
                },
                indent=1,
            )
        )
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "model": args.to_dict(),
            "expert_format": fmt.name, "layout": layout, "group": group,
            "dense": {"file": DENSE_FILE, **dense_entry},
            "expert_files": [EXPERT_FILE], "experts": entries,
            "source": str(src.resolve()), "torch_version": torch.__version__,
        }  # fmt: skip
        place_store(tmp, dst, manifest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves nothing (place_store: dst)
        if isinstance(e, OSError):  # disk full, file too large, I/O error: the user's to fix
            raise StoreError(f"{dst}: writing the store failed ({e.strerror or e}); nothing was "
                             "left behind: free space and convert again") from e  # fmt: skip
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
            f"conversion error against the checkpoint, over {len(errors)} experts (1 in {every} of "
            f"{len(keys)}):\n  " + "\n  ".join(error_summary(sampled))
        )
        if dense_errors:
            vals = list(dense_errors.values())
            log(f"dense {dense}: {len(vals)} matrices quantized, relative L2 error mean "
                f"{sum(vals) / len(vals):.2e} / max {max(vals):.2e}")  # fmt: skip
    return store
