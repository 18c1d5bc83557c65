"""``mer chat``: turns through a real prompt-toolkit session on a pipe, streamed replies that
follow the conversation's history, ``/reset`` and ``/exit``; and the chat prompt helpers."""

from __future__ import annotations

import argparse

import pytest

pytest.importorskip("prompt_toolkit")
from prompt_toolkit import PromptSession  # noqa: E402
from prompt_toolkit.input import create_pipe_input  # noqa: E402
from prompt_toolkit.output import DummyOutput  # noqa: E402

import micro_expert_router as mer  # noqa: E402
from micro_expert_router.commands.chat import chat_loop  # noqa: E402
from micro_expert_router.demo import demo_model_path  # noqa: E402
from micro_expert_router.server.text import StopMatcher, chat_prompt  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    with mer.load(demo_model_path(), dtype="float32") as e:
        yield e


def _args(**kw) -> argparse.Namespace:
    base = dict(system=None, max_tokens=12, temperature=0.0, top_p=1.0, seed=0)
    return argparse.Namespace(**{**base, **kw})


def _reply(engine, history, max_tokens=12) -> str:
    prompt, stops = chat_prompt(engine.tokenizer, history)
    m, out = StopMatcher(stops), []
    for step in engine.generate(prompt, max_tokens=max_tokens, temperature=0):
        piece, stopped = m.feed(step.text)
        out.append(piece if stopped or step.finish_reason is None else piece + m.flush())
        if stopped:
            break
    return "".join(out)


def test_chat_session_history_reset_exit(engine):
    written: list[str] = []
    if True:
        with create_pipe_input() as pipe:
            pipe.send_text("Hello\nWhy is the sky blue?\n/reset\nWhy is the sky blue?\n/exit\n"
                           "never read\n")  # fmt: skip
            session = PromptSession(input=pipe, output=DummyOutput())
            code = chat_loop(engine, lambda: session.prompt("> "), written.append, _args())
        out = "".join(written)
        first = _reply(engine, [{"role": "user", "content": "Hello"}])
        second = _reply(engine, [{"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": first.strip()},
                                 {"role": "user", "content": "Why is the sky blue?"}])  # fmt: skip
        fresh = _reply(engine, [{"role": "user", "content": "Why is the sky blue?"}])
    assert code == 0
    assert out == f"{first}\n{second}\n(new conversation)\n{fresh}\n"
    assert second != fresh  # the second turn saw the first


def test_chat_ends_at_end_of_input(engine):
    if True:
        lines = iter(["/help"])

        def read() -> str:
            try:
                return next(lines)
            except StopIteration:
                raise EOFError from None

        written: list[str] = []
        assert chat_loop(engine, read, written.append, _args()) == 0
    assert "/reset" in written[0]


def test_default_chat_template_and_stops(engine):
    if True:
        assert engine.tokenizer.chat_template is None  # the demo model ships none
        text, stops = chat_prompt(engine.tokenizer, [
            {"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}])
    assert text == "S\n\nQ: U1\nA: A1\n\nQ: U2\nA:"
    assert stops == ["\nQ:"]


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hel", "lo wor", "ld"], ["wor"], "Hello ", True),
        (["ab", "c"], ["cd"], "abc", False),  # "c" held back, then flushed at the end
        (["x\n", "Q", ": next"], ["\nQ:"], "x", True),
        (["a", "b"], [], "ab", False),
    ],
)
def test_stop_matcher(pieces, stops, emitted, stopped):
    m, out, hit = StopMatcher(stops), [], False
    for p in pieces:
        o, hit = m.feed(p)
        out.append(o)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    assert "".join(out) == emitted and hit == stopped


def test_chat_template_from_jinja_file(tmp_path):
    import shutil

    from micro_expert_router.tokenizer import Tokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model_path() / name, tmp_path / name)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = Tokenizer(tmp_path)
    text, stops = chat_prompt(tok, [{"role": "user", "content": "hi"}])
    assert text == "<user>hi<assistant>" and stops == []
