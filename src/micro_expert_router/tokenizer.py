"""Tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, the chat template from
``tokenizer_config.json`` or ``chat_template.jinja`` (Jinja2, sandboxed), and incremental
detokenization for streaming."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from .errors import CheckpointError


class Tokenizer:
    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(
                f"{path}: tokenizer.json not found; text prompts need it "
                "(token-id prompts work without)"
            )
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: cannot load tokenizer ({e})") from None
        self.config: dict[str, Any] = {}
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg}: not valid JSON ({e})") from None
        self.chat_template: str | None = self.config.get("chat_template")
        jinja = folder / "chat_template.jinja"  # where transformers >= 4.50 saves it
        if not self.chat_template and jinja.is_file():
            self.chat_template = jinja.read_text()

    def _special(self, key: str) -> str | None:
        v = self.config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    @property
    def eos_token_id(self) -> int | None:
        s = self._special("eos_token")
        return self.tok.token_to_id(s) if s else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> DecodeStream:
        """A fresh incremental decoder: ``ds.step(self.tok, id)`` returns new text or None."""
        return DecodeStream(skip_special_tokens=True)

    def apply_chat_template(
        self, messages: list[dict[str, str]], template: str | None = None
    ) -> str:
        """Render ``messages`` with the model's chat template, or ``template`` when the model
        has none."""
        template = self.chat_template or template
        if not template:
            raise CheckpointError("this model's tokenizer_config.json has no chat_template")
        from jinja2 import StrictUndefined
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            undefined=StrictUndefined)  # fmt: skip
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent)
        try:
            return env.from_string(template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self._special("bos_token") or "",
                eos_token=self._special("eos_token") or "",
            )
        except TemplateError as e:
            raise CheckpointError(f"chat template failed: {e}") from None
