"""The tokenizer rebuilt from ``tokenizer.ggml.*`` metadata encodes and decodes a fixed text as
the HF tokenizer it was written from: byte-level BPE (GPT-2 and Qwen2 pre-tokenizers, the
bundled demo model's vocabulary) and SentencePiece-style BPE with byte fallback (a vocabulary
trained here with the ``tokenizers`` library, written with scores as llama.cpp's converter does).
"""

from __future__ import annotations

import json

import gguf
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from micro_expert_router.demo import demo_model_path
from micro_expert_router.store.gguf_file import GGUFFile
from micro_expert_router.store.gguf_tokenizer import QWEN2_RE, build_tokenizer, write_tokenizer
from micro_expert_router.tokenizer import Tokenizer as MERTokenizer

TEXT = ("Once upon a time, a little fox said: \"Hello, world!\" 1234567 times.\n\n"
        "  It's 3.14 — naïve café, 東京 🙂\tdone. ") * 3  # fmt: skip
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def _write(path, model, tokens, types, bos, eos, merges=None, scores=None, pre=None,
           add_bos=None):  # fmt: skip
    w = gguf.GGUFWriter(str(path), arch="qwen3moe")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


def _gpt2_fields(hf: Tokenizer):
    data = json.loads(hf.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    special = {a["id"] for a in data["added_tokens"] if a["special"]}
    types = [3 if i in special else 1 for i in range(len(tokens))]
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    return tokens, types, merges


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2"])
def test_byte_level_bpe_matches_hf(tmp_path, pre):
    hf = Tokenizer.from_file(str(demo_model_path() / "tokenizer.json"))
    hf.post_processor = None  # GGUF: add_bos_token false for gpt2 vocabularies
    if pre == "qwen2":
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])  # fmt: skip
    tokens, types, merges = _gpt2_fields(hf)
    gf = _write(tmp_path / "t.gguf", "gpt2", tokens, types, 0, 0, merges=merges, pre=pre)
    tok, config = build_tokenizer(gf)
    ref = hf.encode(TEXT).ids
    assert tok.encode(TEXT).ids == ref and len(ref) > 40
    assert tok.decode(ref) == hf.decode(ref) == TEXT
    assert tok.encode("<|endoftext|>hi").ids[0] == 0  # the control token stays one token
    assert config["eos_token"] == "<|endoftext|>" and config["chat_template"] == TEMPLATE
    write_tokenizer(gf, tmp_path, None)
    mt = MERTokenizer(tmp_path)  # what the engine loads from a converted store
    assert mt.encode(TEXT) == ref and mt.eos_token_id == 0
    assert mt.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>hi<|im_end|>")


def _spm_tokenizer(vocab_size=400):
    """An HF-style SentencePiece BPE (LlamaTokenizerFast's pipeline) trained on TEXT."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])  # fmt: skip
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    special = ["<unk>", "<s>", "</s>", *byte_tokens]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special)
    corpus = [TEXT.replace(" ", "▁")] * 20 + ["▁the▁quick▁brown▁fox▁jumps▁over▁the▁lazy▁dog"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_sentencepiece_bpe_matches_hf(tmp_path):
    hf = _spm_tokenizer()
    data = json.loads(hf.to_str())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    # llama.cpp's converter writes SentencePiece scores; a merge's token scores -(its rank)
    rank = {("".join(m) if isinstance(m, list) else m.replace(" ", "")): r
            for r, m in enumerate(merges)}  # fmt: skip
    scores = [-float(rank.get(t, 0)) - (0.5 if t in rank else 0.0) for t in tokens]
    types = [3 if t in ("<s>", "</s>") else 2 if t == "<unk>" else
             6 if t.startswith("<0x") else 1 for t in tokens]  # fmt: skip
    gf = _write(tmp_path / "t.gguf", "llama", tokens, types, 1, 2, scores=scores, add_bos=True)
    tok, config = build_tokenizer(gf)
    text = "the quick brown fox — 東京 said hello 42 times"
    got = tok.encode(text).ids
    assert got[0] == 1  # BOS
    assert got[1:] == hf.encode(text).ids
    assert tok.decode(got, skip_special_tokens=True) == hf.decode(hf.encode(text).ids) == text
    assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
