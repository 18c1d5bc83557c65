"""``mer chat``: an interactive terminal chat with the model, streamed, in this process.

Line editing and input history come from prompt-toolkit. Each turn renders the whole
conversation with the model's chat template (or the plain fallback of ``server/text.py``) and
generates the reply token by token. ``/reset`` starts a new conversation, ``/exit`` or Ctrl-D
leaves, Ctrl-C stops a reply mid-way (the conversation keeps what was said).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .engine_options import add_engine_arguments, load_engine

HELP = "chat with a model in the terminal (streamed replies, history, /reset, /exit)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per reply at most")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None, help="fix the sampling (default: random)")


def chat_loop(engine, read: Callable[[], str], write: Callable[[str], None],
              args: argparse.Namespace) -> int:  # fmt: skip
    """Run turns until ``/exit`` or end of input. ``read`` returns a line (raises EOFError at
    the end, KeyboardInterrupt on Ctrl-C); ``write`` prints streamed text."""
    from ..errors import MERError
    from ..server.text import StopMatcher, chat_prompt

    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    turn = 0
    while True:
        try:
            line = read().strip()
        except KeyboardInterrupt:
            continue
        except EOFError:
            write("\n")
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(opening)
            write("(new conversation)\n")
            continue
        if line.startswith("/"):
            write("commands: /reset (new conversation), /exit\n")
            continue
        history.append({"role": "user", "content": line})
        prompt, stops = chat_prompt(engine.tokenizer, history)
        ids = engine.encode(prompt)
        room = engine.config.max_context - len(ids)
        if room <= 0:
            history.pop()
            write(f"(the conversation is {len(ids)} tokens, over the context of "
                  f"{engine.config.max_context}: /reset to start again)\n")  # fmt: skip
            continue
        seed = None if args.seed is None else args.seed + turn
        turn += 1
        matcher, reply = StopMatcher(stops), []
        try:
            for step in engine.generate(ids, max_tokens=min(args.max_tokens, room),
                                        temperature=args.temperature, top_p=args.top_p,
                                        seed=seed):  # fmt: skip
                out, stopped = matcher.feed(step.text)
                if step.finish_reason is not None and not stopped:
                    out += matcher.flush()
                reply.append(out)
                write(out)
                if stopped:
                    break
        except KeyboardInterrupt:
            write(" [stopped]")
        except MERError as e:
            write(f"\n(error: {e})")
        write("\n")
        history.append({"role": "assistant", "content": "".join(reply).strip()})


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import InMemoryHistory
    except ModuleNotFoundError as e:
        raise ConfigError(f"`mer chat` needs the serve extra ({e.name} is missing): "
                          "pip install 'micro-expert-router[serve]'") from None  # fmt: skip
    if args.max_tokens <= 0:
        raise ConfigError("--max-tokens must be positive")
    with load_engine(args) as engine:
        if engine.tokenizer is None:
            raise ConfigError(f"{engine.path}: no tokenizer.json, so there is nothing to chat "
                              "with; use `mer generate --prompt-ids`")  # fmt: skip
        print(f"mer chat: {engine.path.name} (/reset starts over, /exit or Ctrl-D leaves)",
              file=sys.stderr)  # fmt: skip
        session: PromptSession = PromptSession(history=InMemoryHistory())

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        return chat_loop(engine, lambda: session.prompt("> "), write, args)
