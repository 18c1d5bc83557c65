"""Train the bundled demo MoE model: a small Mixtral on Debian's fortune cookies, on CPU.

Owns the whole recipe, start to end, so that the shipped folder can be rebuilt bit for bit on
this machine: corpus (``demo_corpus.py``) -> byte-level BPE tokenizer trained on the training
split -> ``MixtralForCausalLM`` trained with the router load-balancing loss -> bf16
``save_pretrained`` folder with tokenizer files -> held-out perplexity against a unigram
baseline, routing statistics, sample continuations, loss curve PNG and a JSON report.

transformers is used here only (it is a test/training extra, never imported by the engine).

Run (about 35 minutes on one core of this 2-core machine):

    python scripts/train_demo.py --out src/micro_expert_router/demo/model \\
        --plot docs/img/demo-loss.png --report /tmp/demo_report.json

Legend: B batch, S sequence length, V vocabulary, E experts, K top-k, N tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_corpus import COPYRIGHT_FILE, DEBIAN_PACKAGES, Corpus, load_corpus  # noqa: E402

EOT = "<|endoftext|>"  # id 0: begins every cookie (bos) and ends it (eos)
REPO = Path(__file__).resolve().parent.parent

PROMPTS = (
    "The meaning of life is",
    "A computer",
    "Q: Why did the programmer",
    "Love is",
    "There was once a",
)


# ---------------------------------------------------------------- tokenizer and data


def train_tokenizer(texts: tuple[str, ...], vocab_size: int) -> Tokenizer:
    """Byte-level BPE on the training split; the post-processor prepends ``<|endoftext|>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, 0)]
    )
    assert tok.token_to_id(EOT) == 0
    return tok


def token_stream(tok: Tokenizer, texts: tuple[str, ...]) -> torch.Tensor:
    """``<eot> cookie <eot> cookie ... <eot>`` as one int64 tensor [N]."""
    ids: list[int] = []
    for enc in tok.encode_batch(list(texts)):
        ids.extend(enc.ids)  # starts with <eot> (post-processor)
    ids.append(0)
    return torch.tensor(ids, dtype=torch.long)


def heldout_windows(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, list[int]]:
    """Non-overlapping windows [W, S+1] covering the stream; the tail window is left-padded
    by overlap (its already-scored positions are masked out by ``heldout_targets``)."""
    n = stream.numel()
    starts = list(range(0, n - seq_len - 1, seq_len))
    last = n - seq_len - 1
    if not starts or starts[-1] != last:
        starts.append(last)
    return torch.stack([stream[s : s + seq_len + 1] for s in starts]), starts


def heldout_targets(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows [W, S+1] and a mask [W, S] selecting each stream token (after the first) once."""
    win, starts = heldout_windows(stream, seq_len)
    mask = torch.ones(win.shape[0], seq_len, dtype=torch.bool)
    if len(starts) > 1:
        covered = starts[-2] + seq_len + 1  # tokens [0, covered) already predicted or given
        overlap = covered - (starts[-1] + 1)
        mask[-1, : max(overlap, 0)] = False
    return win, mask


def unigram_nll(train: torch.Tensor, targets: torch.Tensor, vocab: int) -> float:
    """Mean NLL (nats) of ``targets`` under add-one-smoothed training-split token frequencies."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0  # [V]
    logp = (counts / counts.sum()).log()
    return float(-logp[targets].mean())


# ---------------------------------------------------------------- model


def build_model(args: argparse.Namespace, vocab: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=args.max_pos,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    return MixtralForCausalLM(cfg)


def param_counts(model) -> dict[str, int]:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size
    experts = per_expert * cfg.num_local_experts * cfg.num_hidden_layers
    dense = total - experts
    active = dense + per_expert * cfg.num_experts_per_tok * cfg.num_hidden_layers
    return {
        "total": total,
        "per_expert": per_expert,
        "all_experts": experts,
        "dense": dense,
        "active_per_token": active,
    }


def autocast(args: argparse.Namespace) -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def evaluate(model, win: torch.Tensor, mask: torch.Tensor, batch: int) -> tuple[float, int]:
    """Mean next-token NLL (nats) over the masked held-out targets, and their count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, win.shape[0], batch):
        x = win[i : i + batch]  # [B, S+1]
        logits = model(input_ids=x[:, :-1], output_router_logits=False).logits.float()  # [B,S,V]
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # [B, S]
        m = mask[i : i + batch]
        total += float(nll[m].sum())
        count += int(m.sum())
    model.train(was_training)
    return total / count, count


@torch.no_grad()
def routing_stats(model, win: torch.Tensor, batch: int) -> list[dict[str, float]]:
    """Per layer: expert usage entropy, busiest expert's share, and token-to-token reuse.

    ``reuse`` is the mean of |S_t ∩ S_{t-1}| / K over consecutive tokens of a window (S_t = the
    top-K set at token t); a router that picked experts uniformly at random would give K / E.
    ``reuse_last4`` is the share of S_t found in S_{t-4} ∪ ... ∪ S_{t-1} (random:
    1 - (1 - K/E)^4): what a per-layer cache holding the last four tokens' experts would hit.
    """
    W = 4
    cfg = model.config
    E, K = cfg.num_local_experts, cfg.num_experts_per_tok
    L = cfg.num_hidden_layers
    usage = torch.zeros(L, E, dtype=torch.float64)
    reuse_sum = torch.zeros(L, dtype=torch.float64)
    recent_sum = torch.zeros(L, dtype=torch.float64)
    reuse_n = recent_n = 0
    model.eval()
    for i in range(0, win.shape[0], batch):
        x = win[i : i + batch, :-1]  # [B, S]
        out = model(input_ids=x, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # each [B*S, E]
            top = logits.float().topk(K, dim=-1).indices.view(x.shape[0], x.shape[1], K)
            onehot = F.one_hot(top, E).sum(2)  # [B, S, E] in {0, 1}
            usage[layer] += onehot.sum((0, 1)).double()
            shared = (onehot[:, 1:] * onehot[:, :-1]).sum(-1)  # [B, S-1]
            reuse_sum[layer] += shared.double().sum() / K
            S = x.shape[1]
            recent = torch.stack([onehot[:, W - j : S - j] for j in range(1, W + 1)]).amax(0)
            recent_sum[layer] += (recent * onehot[:, W:]).sum().double() / K  # recent [B,S-W,E]
        reuse_n += x.shape[0] * (x.shape[1] - 1)
        recent_n += x.shape[0] * (x.shape[1] - W)
    stats = []
    for layer in range(L):
        p = usage[layer] / usage[layer].sum()
        ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
        stats.append(
            {
                "layer": layer,
                "usage_entropy_bits": ent,
                "max_entropy_bits": math.log2(E),
                "busiest_share": float(p.max()),
                "idlest_share": float(p.min()),
                "reuse": float(reuse_sum[layer] / reuse_n),
                "random_reuse": K / E,
                "reuse_last4": float(recent_sum[layer] / recent_n),
                "random_reuse_last4": 1 - (1 - K / E) ** W,
                "usage_share": [round(float(v), 4) for v in p],
            }
        )
    return stats


@torch.no_grad()
def continuations(model, tok: Tokenizer, seed: int, new_tokens: int) -> list[dict[str, str]]:
    out = []
    gen = torch.Generator().manual_seed(seed)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])  # [1, N], starts with <eot>
        row = {"prompt": prompt}
        for mode in ("greedy", "sampled"):
            x = ids
            for _ in range(new_tokens):
                logits = model(input_ids=x, output_router_logits=False).logits[0, -1].float()
                if mode == "greedy":
                    nxt = int(logits.argmax())
                else:  # temperature 0.8, top-k 40
                    v, idx = (logits / 0.8).topk(40)
                    nxt = int(idx[torch.multinomial(v.softmax(-1), 1, generator=gen)])
                if nxt == 0:
                    break
                x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
            row[mode] = tok.decode(x[0].tolist(), skip_special_tokens=True)
        out.append(row)
    return out


# ---------------------------------------------------------------- saving


def save_folder(model, tok: Tokenizer, out: Path, corpus: Corpus, args: argparse.Namespace):
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        (out / stale).unlink(missing_ok=True)
    model.config.output_router_logits = False  # inference default, as in released checkpoints
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.config.output_router_logits = True
    GenerationConfig(bos_token_id=0, eos_token_id=0, do_sample=False).save_pretrained(out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=None, pad_token=None
    )
    fast.model_max_length = args.max_pos
    fast.save_pretrained(out)
    # The portable class name: transformers 4 and 5 both load it as a fast tokenizer.
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    if COPYRIGHT_FILE.exists():
        shutil.copyfile(COPYRIGHT_FILE, out / "CORPUS_COPYRIGHT")
    (out / "README.md").write_text(model_card(corpus, args))


def model_card(corpus: Corpus, args: argparse.Namespace) -> str:
    return f"""# MER demo model

A small Mixtral-architecture mixture-of-experts language model, trained from scratch by
`scripts/train_demo.py` in the Micro-Expert-Router repository, bundled so that `mer generate`
runs offline. It writes text that reads like fortune cookies; it knows nothing else.

- Architecture: `MixtralForCausalLM`, {args.layers} layers, hidden {args.hidden},
  {args.experts} experts per layer (intermediate {args.inter}), top-{args.top_k} routing,
  {args.heads} attention heads ({args.kv_heads} key/value heads), tied embeddings, bfloat16.
- Tokenizer: byte-level BPE, {args.vocab} tokens, trained on the training split.
  `<|endoftext|>` (id 0) begins every cookie (the tokenizer prepends it) and ends it.
- Corpus: the fortune cookie files of Debian's `{"` and `".join(DEBIAN_PACKAGES)}` packages
  (Debian main, version 1:1.99.1), read from `{corpus.source_dir}`:
  {len(corpus.files)} files ({", ".join(corpus.files)}), {len(corpus.train)} training and
  {len(corpus.heldout)} held-out cookies (crc32 split, 5%).
- Licence: the corpus is distributed by Debian under the BSD licence of fortune(6), reproduced
  with its full notice in `CORPUS_COPYRIGHT` (a verbatim copy of
  `/usr/share/doc/fortunes/copyright`); the cookies are quotations attributed to their
  authors. The weights and the training code are released with the project (MIT).
- Rebuild: `python scripts/train_demo.py --seed {args.seed} --steps {args.steps}`
  (see `docs/demo-model.md` for figures).
"""


def plot_curve(log: list[dict], unigram: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in log if "ce" in r]
    evals = [r for r in log if "eval_ce" in r]
    steps = [r["step"] for r in train]
    ce = [r["ce"] for r in train]
    w = 25  # running mean over 25 steps
    smooth = [
        sum(ce[max(0, i - w + 1) : i + 1]) / len(ce[max(0, i - w + 1) : i + 1])
        for i in range(len(ce))
    ]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, ce, color="#9ecae1", lw=0.6, label="train cross-entropy (per step)")
    ax.plot(steps, smooth, color="#08519c", lw=1.5, label=f"train, running mean of {w}")
    ax.plot(
        [r["step"] for r in evals],
        [r["eval_ce"] for r in evals],
        "o-",
        color="#d94801",
        ms=4,
        label="held-out cross-entropy",
    )
    ax.axhline(unigram, color="grey", ls="--", lw=1, label="unigram baseline (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per token")
    ax.set_ylim(bottom=max(0.0, min(ce) - 0.5), top=unigram + 0.8)
    ax.set_title("MER demo model (Mixtral, fortune cookies)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "src/micro_expert_router/demo/model")
    p.add_argument("--plot", type=Path, default=REPO / "docs/img/demo-loss.png")
    p.add_argument("--report", type=Path, default=Path("/tmp/demo_report.json"))
    p.add_argument("--log", type=Path, default=Path("/tmp/demo_train_log.jsonl"))
    p.add_argument("--steps", type=int, default=2600)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; on a shared 2-core box 1 thread ran 5-10x faster than 2",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--vocab", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=224)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-pos", type=int, default=1024)
    p.add_argument("--sample-tokens", type=int, default=48)
    p.add_argument(
        "--no-autocast",
        dest="autocast",
        action="store_false",
        help="train in plain float32 (about 2x slower here)",
    )
    p.add_argument("--no-save", action="store_true", help="train and report only (for timing)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    corpus = load_corpus()
    tok = train_tokenizer(corpus.train, args.vocab)
    V = tok.get_vocab_size()
    train_ids = token_stream(tok, corpus.train)  # [N]
    held_ids = token_stream(tok, corpus.heldout)
    win, mask = heldout_targets(held_ids, args.seq_len)  # [W, S+1], [W, S]
    targets = win[:, 1:][mask]
    uni = unigram_nll(train_ids, targets, V)
    print(
        f"corpus: {len(corpus.train)} train / {len(corpus.heldout)} held-out cookies; "
        f"{train_ids.numel()} / {held_ids.numel()} tokens; vocab {V}; "
        f"unigram held-out ppl {math.exp(uni):.1f}"
    )

    model = build_model(args, V)
    counts = param_counts(model)
    print("params:", counts)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)  # the only source of data order
    coef = args.aux_coef
    log: list[dict] = []
    args.log.parent.mkdir(parents=True, exist_ok=True)
    logf = args.log.open("w")
    t_train = time.time()
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True)
    model.train()
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = torch.randint(
            0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen
        )
        x = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts])  # [B, S+1]
        with autocast(args):  # bf16 matmuls, fp32 master weights and optimizer state
            out = model(input_ids=x[:, :-1], output_router_logits=True)
            logits = out.logits.float()  # [B, S, V]
            ce_loss = F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))
            loss = ce_loss + coef * out.aux_loss.float()  # Switch-style load balancing
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ce = float(ce_loss)
        rec = {
            "step": step,
            "ce": ce,
            "aux": float(out.aux_loss),
            "lr": lr_at(step, args),
            "elapsed_s": time.time() - t_train,
        }
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            with autocast(args):
                rec["eval_ce"], _ = evaluate(model, win, mask, 32)
            bar.write(
                f"step {step + 1}: held-out ce {rec['eval_ce']:.3f} "
                f"(ppl {math.exp(rec['eval_ce']):.1f})"
            )
        log.append(rec)
        logf.write(json.dumps(rec) + "\n")
        logf.flush()
        tok_s = (step + 1) * args.batch * args.seq_len / (time.time() - t_train)
        bar.set_postfix(ce=f"{ce:.3f}", aux=f"{rec['aux']:.3f}", tok_s=f"{tok_s:.0f}")
    train_s = time.time() - t_train
    logf.close()

    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {
            "files": corpus.files,
            "train_cookies": len(corpus.train),
            "heldout_cookies": len(corpus.heldout),
            "train_tokens": train_ids.numel(),
            "heldout_tokens": held_ids.numel(),
            "heldout_targets": targets.numel(),
        },
        "params": counts,
        "train_seconds": train_s,
        "tokens_seen": args.steps * args.batch * args.seq_len,
        "unigram_ppl": math.exp(uni),
        "fp32_heldout_ppl": math.exp(evaluate(model, win, mask, 32)[0]),
        "autocast_heldout_ppl": math.exp(log[-1]["eval_ce"]),
    }
    torch.save(model.state_dict(), "/tmp/demo_fp32_state.pt")  # insurance against a failed save
    if not args.no_save:
        save_folder(model, tok, args.out, corpus, args)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16)
        report["folder_bytes"] = sum(p.stat().st_size for p in args.out.iterdir())
        report["safetensors_bytes"] = (args.out / "model.safetensors").stat().st_size
    else:
        model = model.to(torch.bfloat16)
    model.eval()
    report["shipped_heldout_ppl"] = math.exp(evaluate(model, win, mask, 32)[0])
    report["routing"] = routing_stats(model, win, 32)
    report["samples"] = continuations(model, tok, args.seed, args.sample_tokens)
    report["total_seconds"] = time.time() - t_start
    plot_curve(log, uni, args.plot)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k not in ("samples", "args")}, indent=1))
    for s in report["samples"]:
        print(f"--- {s['prompt']!r}\n[greedy]  {s['greedy']!r}\n[sampled] {s['sampled']!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
