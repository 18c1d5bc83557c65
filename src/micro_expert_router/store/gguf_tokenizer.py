"""The tokenizer and chat template of a GGUF model, rebuilt from its ``tokenizer.ggml.*`` metadata
as a ``tokenizers`` Tokenizer (written to the store as ``tokenizer.json`` and
``tokenizer_config.json``, which ``tokenizer.py`` reads like any checkpoint's).

- ``gpt2``: byte-level BPE from ``tokens`` and ``merges``. The pre-tokenizer regex follows
  ``tokenizer.ggml.pre`` as llama.cpp does (``qwen2``, ``llama-bpe``/``llama3``, else GPT-2's).
- ``llama``: SentencePiece-style BPE with byte fallback; GGUF stores no merges for it, so they
  are derived from the vocabulary and scores the way HF's SentencePiece converter does (a merge
  for every pair of tokens whose concatenation is a token, ranked by that token's score).

Token types 3 (control) and 4 (user-defined) become added tokens (control ones special); BOS is
prepended when ``add_bos_token`` is set (default: on for ``llama``, off for ``gpt2``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .gguf_file import GGUFFile

QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
            r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
PRE_REGEX = {"qwen2": QWEN2_RE, "llama-bpe": LLAMA3_RE, "llama3": LLAMA3_RE}
CONTROL, USER_DEFINED = 3, 4


def _gpt2(tokens: list[str], merges: list[str], pre: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in PRE_REGEX))
    regex = PRE_REGEX.get(pre or "")
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    return tok


def _llama(tokens: list[str], scores: list[float]):
    from tokenizers import Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab:
                merges.append((scores[i] if i < len(scores) else 0.0, i, vocab[a], vocab[b]))
    merges.sort(key=lambda m: (-m[0], m[1], m[2], m[3]))  # by score, then ids
    pairs = [(tokens[a], tokens[b]) for _, _, a, b in merges]
    unk = next((t for t in ("<unk>",) if t in vocab), None)
    tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])  # fmt: skip
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    return tok


def build_tokenizer(gf: GGUFFile) -> tuple[Any, dict[str, Any]] | None:
    """(``tokenizers.Tokenizer``, tokenizer_config dict), or ``None`` when the file has no
    tokenizer of a kind MER rebuilds."""
    kind = gf.get("tokenizer.ggml.model")
    tokens = gf.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or not tokens:
        return None
    from tokenizers import AddedToken, processors  # only when there is one to build

    if kind == "gpt2":
        tok = _gpt2(tokens, gf.get("tokenizer.ggml.merges") or [], gf.get("tokenizer.ggml.pre"))
    else:
        tok = _llama(tokens, gf.get("tokenizer.ggml.scores") or [])
    types = gf.get("tokenizer.ggml.token_type") or []
    added = [AddedToken(tokens[i], special=ty == CONTROL, normalized=False)
             for i, ty in enumerate(types) if ty in (CONTROL, USER_DEFINED)]  # fmt: skip
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    bos, eos = gf.get("tokenizer.ggml.bos_token_id"), gf.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(gf.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b}:0 $A:0", pair=f"{b}:0 $A:0 {b}:1 $B:1", special_tokens=[(b, bos)])
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if bos is not None:
        config["bos_token"] = tokens[bos]
    if eos is not None:
        config["eos_token"] = tokens[eos]
    template = gf.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


def write_tokenizer(gf: GGUFFile, folder: Path, log: Callable[[str], None] | None) -> list[str]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``folder``; the names
    written (none, with a message, when the GGUF's tokenizer kind is not supported)."""
    built = build_tokenizer(gf)
    if built is None:
        if log is not None:
            log(f"{gf.path}: tokenizer kind {gf.get('tokenizer.ggml.model')!r} is not rebuilt "
                "(supported: gpt2, llama); prompts must be token ids")  # fmt: skip
        return []
    tok, config = built
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return ["tokenizer.json", "tokenizer_config.json"]
