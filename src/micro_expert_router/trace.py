"""Routing traces: which experts each token used, recorded from the engine and read back.

This module owns the trace formats (spec: docs/trace-format.md): our own JSON Lines format
(``mer-trace``, a header line then one line per token with each MoE layer's experts in rank
order, their gate weights, the forward step and prefill flag, and optionally the router-input
hidden states in a side ``.npy`` file), a ``TraceWriter`` the engine drives as it generates, and
readers for it and for the third-party "layer-expert pairs" format (one JSON array of
``[layer, expert]`` pairs per decode token, as recorded by BrianBoitano/nvmoe from llama.cpp).
``read_trace`` tells the two apart by content, never by file name. Replaying a trace through a
cache is ``sim/replay.py``'s job; the engine decides when to call the writer.

Legend: T tokens, L MoE layers, K experts per token and layer (top-k), D hidden size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from .errors import TraceError

FORMAT = "mer-trace"
VERSION = 1
PAIRS_FORMAT = "layer-expert-pairs"
HIDDEN_DTYPES = {"float16": np.float16, "float32": np.float32}
_NPY_HEADER_BYTES = 128  # room for any [T, L, D] shape, so the header can be rewritten at close


@dataclass(frozen=True, eq=False)
class Trace:
    """A routing trace in memory. Arrays are read-only."""

    experts: np.ndarray  # [T, L, K] int32, each layer's experts in rank order (best first)
    weights: np.ndarray | None  # [T, L, K] float32 gate weights, None if not recorded
    prefill: np.ndarray  # [T] bool, True for prompt tokens
    step: np.ndarray  # [T] int64 forward step: 0, 1, ...; a prefill batch shares one step
    token_ids: np.ndarray  # [T] int64 input token at that position, -1 if unknown
    layers: tuple[int, ...]  # the MoE layer ids, in model order (length L)
    num_experts: int  # routed experts per layer
    model: Mapping[str, Any] = field(default_factory=dict)  # free-form description
    expert_bytes: int | None = None  # bytes one expert occupies in the cache, if known
    hidden_file: Path | None = None  # side file with the router inputs, [T, L, D]
    path: Path | None = None
    format: str = FORMAT

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[2]

    @property
    def num_steps(self) -> int:
        return int(self.step[-1]) + 1 if self.num_tokens else 0

    def step_bounds(self) -> list[tuple[int, int]]:
        """``[start, end)`` token ranges of the forward steps, in order."""
        if not self.num_tokens:
            return []
        starts = np.flatnonzero(np.diff(self.step, prepend=-1))
        ends = np.append(starts[1:], self.num_tokens)
        return list(zip(starts.tolist(), ends.tolist(), strict=True))

    def hidden_states(self) -> np.ndarray:
        """The router inputs ``[T, L, D]`` (memory-mapped, read-only)."""
        if self.hidden_file is None:
            raise TraceError(f"{self.path}: this trace has no hidden states (record with them)")
        try:
            h = np.load(self.hidden_file, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise TraceError(f"{self.hidden_file}: cannot read the hidden states ({e}); was the "
                             "recording interrupted?") from None  # fmt: skip
        if h.ndim != 3 or h.shape[:2] != (self.num_tokens, self.num_layers):
            raise TraceError(
                f"{self.hidden_file}: hidden states have shape {h.shape}, expected "
                f"[{self.num_tokens}, {self.num_layers}, D]; the recording was interrupted?"
            )
        return h

    @classmethod
    def from_arrays(
        cls,
        experts: Any,
        num_experts: int,
        *,
        layers: Sequence[int] | None = None,
        weights: Any = None,
        prefill: Any = None,
        step: Any = None,
        token_ids: Any = None,
        **meta: Any,
    ) -> Trace:
        """A validated trace from arrays (``experts`` ``[T, L, K]``); steps default to one per
        token, prefill to False."""
        where = str(meta.get("path") or "trace")
        ex = _int_array(experts, where, "experts")
        if ex.ndim != 3:
            raise TraceError(f"{where}: experts must be [tokens, layers, k], got {ex.shape}")
        t, l, _ = ex.shape
        layers = tuple(range(l)) if layers is None else tuple(int(x) for x in layers)
        w = None if weights is None else np.asarray(weights, dtype=np.float32)
        pf = np.zeros(t, bool) if prefill is None else np.asarray(prefill, dtype=bool)
        st = np.arange(t, dtype=np.int64) if step is None else _int_array(step, where, "step")
        ids = np.full(t, -1, np.int64) if token_ids is None else _int_array(token_ids, where, "ids")
        trace = cls(ex.astype(np.int32), w, pf, st.astype(np.int64), ids.astype(np.int64),
                    layers, int(num_experts), **meta)  # fmt: skip
        _validate(trace)
        for a in (trace.experts, trace.weights, trace.prefill, trace.step, trace.token_ids):
            if a is not None:
                a.flags.writeable = False
        return trace


def _int_array(x: Any, where: str, what: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except ValueError:
        raise TraceError(f"{where}: {what} is ragged (rows of different lengths)") from None
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TraceError(f"{where}: {what} must be integers, got {a.dtype}")
    return a.astype(np.int64)


def _validate(tr: Trace) -> None:
    where = str(tr.path or "trace")
    t, l, k = tr.experts.shape
    if len(tr.layers) != l or len(set(tr.layers)) != l:
        raise TraceError(f"{where}: {len(tr.layers)} layer ids for {l} layers, or repeats")
    if tr.num_experts <= 0 or k == 0 or k > tr.num_experts:
        raise TraceError(f"{where}: top-k {k} does not fit {tr.num_experts} experts per layer")
    if t and (tr.experts.min() < 0 or tr.experts.max() >= tr.num_experts):
        bad = np.argwhere((tr.experts < 0) | (tr.experts >= tr.num_experts))[0]
        raise TraceError(f"{where}: token {bad[0]} layer {tr.layers[bad[1]]}: expert id "
                         f"{tr.experts[tuple(bad)]} outside [0, {tr.num_experts})")  # fmt: skip
    if t and k > 1:
        dup = (np.diff(np.sort(tr.experts, axis=2), axis=2) == 0).any(axis=2)  # [T, L]
        if dup.any():
            i, j = np.argwhere(dup)[0]
            raise TraceError(f"{where}: token {i} layer {tr.layers[j]} names an expert twice: "
                             f"{tr.experts[i, j].tolist()}")  # fmt: skip
    if tr.weights is not None and (
        tr.weights.shape != tr.experts.shape or not np.isfinite(tr.weights).all()
    ):
        raise TraceError(f"{where}: gate weights must be finite and shaped like the experts")
    for name, a in (("prefill", tr.prefill), ("step", tr.step), ("token ids", tr.token_ids)):
        if a.shape != (t,):
            raise TraceError(f"{where}: {name} has shape {a.shape}, expected ({t},)")
    if t and (tr.step[0] != 0 or not np.isin(np.diff(tr.step), (0, 1)).all()):
        raise TraceError(f"{where}: steps must start at 0 and grow by 0 or 1 per token")


# -- writing -------------------------------------------------------------------------------
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy v1.0 header of exactly _NPY_HEADER_BYTES bytes."""
    d = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {shape}, }}"
    body = d.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


class TraceWriter:
    """Streams a ``mer-trace`` file as the engine generates. Per forward step, call ``route``
    once per MoE layer (any order) with that step's ``[T, K]`` experts and weights (and the
    ``[T, D]`` router input if hidden states are recorded), then ``end_step``. A context manager;
    ``close`` finishes the hidden-state file. Inputs may be numpy arrays, torch tensors or lists.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        layers: Sequence[int],
        num_experts: int,
        top_k: int,
        model: Mapping[str, Any] | None = None,
        expert_bytes: int | None = None,
        hidden_size: int | None = None,
        hidden_dtype: str = "float16",
        weight_digits: int = 6,
    ) -> None:
        self.path = Path(path)
        self.layers = tuple(int(x) for x in layers)
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.hidden_size = hidden_size
        self.weight_digits = weight_digits
        if hidden_dtype not in HIDDEN_DTYPES:
            raise TraceError(f"hidden_dtype must be one of {sorted(HIDDEN_DTYPES)}")
        self._dtype = np.dtype(HIDDEN_DTYPES[hidden_dtype])
        self.tokens = self.steps = 0
        self._pending: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
        hidden = None
        self._hidden_fh = None
        self.hidden_path: Path | None = None
        if hidden_size is not None:
            self.hidden_path = self.path.with_name(self.path.name + ".hidden.npy")
            hidden = {"file": self.hidden_path.name, "dtype": hidden_dtype,
                      "hidden_size": int(hidden_size)}  # fmt: skip
            self._hidden_fh = open(self.hidden_path, "wb")  # noqa: SIM115 (closed in close)
            self._hidden_fh.write(self._header_for(0))
        header = {"format": FORMAT, "version": VERSION, "layers": list(self.layers),
                  "num_experts": self.num_experts, "top_k": self.top_k, "model": dict(model or {}),
                  "expert_bytes": expert_bytes, "hidden": hidden}  # fmt: skip
        self._fh: TextIO | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
        self._fh.write(json.dumps(header) + "\n")
        self._fh.flush()

    def _header_for(self, t: int) -> bytes:
        return _npy_header(self._dtype, (t, len(self.layers), int(self.hidden_size or 0)))

    def route(self, layer: int, experts: Any, weights: Any = None, hidden: Any = None) -> None:
        """One MoE layer's routing for the current step: ``experts`` ``[T, K]`` in rank order,
        ``weights`` ``[T, K]``, ``hidden`` ``[T, D]`` (the router input)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not one of the trace's MoE layers {self.layers}")
        ex = np.asarray(experts, dtype=np.int64)
        if ex.ndim != 2 or ex.shape[1] != self.top_k:
            raise ValueError(f"experts must be [T, {self.top_k}], got {ex.shape}")
        w = None if weights is None else np.asarray(weights, dtype=np.float32)
        if w is not None and w.shape != ex.shape:
            raise ValueError(f"weights {w.shape} must match experts {ex.shape}")
        h = None
        if self._hidden_fh is not None:
            if hidden is None:
                raise ValueError("this trace records hidden states: pass hidden=[T, D]")
            h = np.asarray(hidden, dtype=np.float32)
            if h.shape != (ex.shape[0], self.hidden_size):
                raise ValueError(f"hidden must be [{ex.shape[0]}, {self.hidden_size}]")
        self._pending[layer] = (ex, w, h)

    def end_step(self, *, prefill: bool = False, token_ids: Sequence[int] | None = None) -> None:
        """Write the step's tokens (one line each)."""
        if self._fh is None:
            raise ValueError("the trace writer is closed")
        missing = [l for l in self.layers if l not in self._pending]
        if missing:
            raise ValueError(f"end_step before layers {missing} were routed")
        parts = [self._pending[l] for l in self.layers]
        t = parts[0][0].shape[0]
        if any(p[0].shape[0] != t for p in parts):
            raise ValueError("layers of one step routed different numbers of tokens")
        ids = [-1] * t if token_ids is None else [int(x) for x in token_ids]
        if len(ids) != t:
            raise ValueError(f"{len(ids)} token ids for a step of {t} tokens")
        has_w = all(p[1] is not None for p in parts)
        for i in range(t):
            line: dict[str, Any] = {"i": self.tokens, "step": self.steps, "prefill": bool(prefill),
                                    "token": ids[i] if ids[i] >= 0 else None,
                                    "experts": [p[0][i].tolist() for p in parts]}  # fmt: skip
            if has_w:
                line["weights"] = [[round(float(x), self.weight_digits) for x in p[1][i]]
                                   for p in parts]  # fmt: skip
            self._fh.write(json.dumps(line, separators=(",", ":")) + "\n")
            self.tokens += 1
        if self._hidden_fh is not None:
            h = np.stack([p[2] for p in parts], axis=1).astype(self._dtype)  # [T, L, D]
            self._hidden_fh.write(np.ascontiguousarray(h).tobytes())
        self._fh.flush()
        self.steps += 1
        self._pending.clear()

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        if self._hidden_fh is not None:
            self._hidden_fh.seek(0)
            self._hidden_fh.write(self._header_for(self.tokens))
            self._hidden_fh.close()
            self._hidden_fh = None

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- reading -------------------------------------------------------------------------------
def _parse(path: Path, n: int, raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise TraceError(
            f"{path}: line {n} is not JSON ({e.msg}); not a routing trace, or one cut short?"
        ) from None


def _lines(path: Path):
    """(line number, parsed JSON) for each non-empty line, TraceError on anything else."""
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        raise TraceError(f"{path}: cannot open the trace: {e.strerror}") from None
    with fh:
        n = 0
        try:
            for n, raw in enumerate(fh, 1):
                if raw.strip():
                    yield n, _parse(path, n, raw)
        except UnicodeDecodeError:
            raise TraceError(f"{path}: line {n + 1} is not UTF-8 text; not a trace") from None


def read_trace(path: str | Path, num_experts: int | None = None) -> Trace:
    """Read a routing trace in either supported format, recognised by its first line.
    ``num_experts`` overrides the experts-per-layer count (needed by pairs traces whose highest
    expert id never occurs)."""
    path = Path(path)
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise TraceError(f"{path}: the trace is empty")
    n, obj = first
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _read_mer(path, obj, lines, num_experts)
    if isinstance(obj, list):
        return _read_pairs(path, first, lines, num_experts)
    raise TraceError(f"{path}: line {n} is neither a mer-trace header nor a list of [layer, "
                     "expert] pairs; not a routing trace (see docs/trace-format.md)")  # fmt: skip


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _read_header(path: Path, head: dict, num_experts: int | None) -> dict[str, Any]:
    """The checked fields of a mer-trace header line."""
    if head.get("version") != VERSION:
        raise TraceError(f"{path}: mer-trace version {head.get('version')!r} is not supported "
                         f"(this reader knows version {VERSION}); upgrade mer")  # fmt: skip
    layers, k = head.get("layers"), head.get("top_k")
    n_exp = num_experts or head.get("num_experts")
    if not (isinstance(layers, list) and all(map(_is_int, layers))) or not all(
        _is_int(v) and v > 0 for v in (k, n_exp)
    ):
        raise TraceError(f"{path}: bad header: layers must be a list of layer ids, num_experts "
                         "and top_k whole numbers > 0")  # fmt: skip
    model, eb, hidden = head.get("model") or {}, head.get("expert_bytes"), head.get("hidden")
    if not isinstance(model, dict) or not (eb is None or (_is_int(eb) and eb >= 0)):
        raise TraceError(f"{path}: bad header: model must be an object, expert_bytes a whole "
                         "number or null")  # fmt: skip
    if hidden is not None and not (
        isinstance(hidden, dict) and isinstance(hidden.get("file"), str)
        and hidden["file"] not in ("", ".", "..") and "/" not in hidden["file"]
        and "\0" not in hidden["file"]
    ):  # fmt: skip
        raise TraceError(f"{path}: bad header: hidden must be null or name a file next to the "
                         "trace")  # fmt: skip
    hidden_file = path.with_name(hidden["file"]) if hidden is not None else None
    return {"layers": layers, "num_experts": n_exp, "top_k": k, "model": model,
            "expert_bytes": eb or None, "hidden_file": hidden_file}  # fmt: skip


def _read_mer(path: Path, head: dict, lines, num_experts: int | None) -> Trace:
    h = _read_header(path, head, num_experts)
    layers, k = h["layers"], h["top_k"]
    experts, weights, prefill, step, ids = [], [], [], [], []
    for n, d in lines:
        try:
            if d["i"] != len(experts):
                raise TraceError(f"{path}: line {n} has token index {d['i']}, "
                                 f"expected {len(experts)}")  # fmt: skip
            ex = d["experts"]
            if len(ex) != len(layers) or any(len(row) != k for row in ex):
                raise TraceError(f"{path}: line {n}: experts must be {len(layers)} lists of "
                                 f"{k} ids")  # fmt: skip
            experts.append(ex)
            w = d.get("weights")
            if w is not None and (len(w) != len(layers) or any(len(r) != k for r in w)):
                raise TraceError(f"{path}: line {n}: weights must match experts")
            weights.append(w)
            prefill.append(bool(d.get("prefill", False)))
            step.append(int(d.get("step", len(step))))
            tok = d.get("token")
            ids.append(-1 if tok is None else int(tok))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise TraceError(f"{path}: line {n} is not a mer-trace token line ({e!r})") from None
    has_w = bool(weights) and all(w is not None for w in weights)
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below, by name
            arrays = {
                "experts": np.asarray(experts).reshape(len(experts), len(layers), k),
                "weights": np.asarray(weights, dtype=np.float32) if has_w else None,
                "step": np.asarray(step, dtype=np.int64),
                "token_ids": np.asarray(ids, dtype=np.int64),
            }
    except (ValueError, TypeError, OverflowError) as e:
        raise TraceError(f"{path}: token lines hold something other than numbers ({e})") from None
    if arrays["weights"] is not None and not np.isfinite(arrays["weights"]).all():
        raise TraceError(f"{path}: a gate weight is not a finite float32 (NaN, infinite or "
                         "beyond 3.4e38); gate weights are probabilities")  # fmt: skip
    return Trace.from_arrays(
        arrays.pop("experts"), h["num_experts"], layers=layers, prefill=prefill, **arrays,
        model=dict(h["model"]), expert_bytes=h["expert_bytes"], hidden_file=h["hidden_file"],
        path=path, format=FORMAT,
    )  # fmt: skip


def _read_pairs(path: Path, first: tuple[int, Any], lines, num_experts: int | None) -> Trace:
    rows, layers, k, pattern = [], None, 0, None
    for n, d in (first, *lines):
        try:
            a = np.asarray(d)
        except (ValueError, TypeError):
            a = np.zeros((0,))
        if a.ndim != 2 or a.shape[1:] != (2,) or not np.issubdtype(a.dtype, np.integer):
            raise TraceError(f"{path}: line {n} is not a list of [layer, expert] pairs")
        if layers is None:  # the first line fixes the layers, their order and k
            layers = list(dict.fromkeys(a[:, 0].tolist()))
            k = len(a) // len(layers)
            pattern = np.repeat(np.asarray(layers), k)
        if a.shape[0] != len(pattern) or not np.array_equal(a[:, 0], pattern):
            raise TraceError(f"{path}: line {n}: expected {k} experts for each of the layers "
                             f"{layers}, grouped by layer, as on the first line")  # fmt: skip
        rows.append(a[:, 1])
    ex = np.stack(rows).reshape(len(rows), len(layers), k)
    seen = int(ex.max()) + 1
    if num_experts is not None and num_experts < seen:
        raise TraceError(f"{path}: expert id {seen - 1} occurs but num_experts is {num_experts}")
    return Trace.from_arrays(ex, num_experts or seen, layers=layers, path=path,
                             format=PAIRS_FORMAT)  # fmt: skip
