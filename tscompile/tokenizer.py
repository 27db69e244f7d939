"""A Hugging Face tokenizer folder: `tokenizer.json` (run by the `tokenizers` library) plus
`tokenizer_config.json` (special tokens and the jinja2 chat template).

What it is: encode, decode, special-token ids and chat-template rendering without
`transformers` (the serving API process and `tscompile generate` use it). What it is not: a
tokenizer implementation or an incremental detokenizer (the server adds that).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {self.dir}")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = self.dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.chat_template: str | None = self.config.get("chat_template")
        gen_path = self.dir / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        eos = gen.get("eos_token_id")
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.eos_token is not None and (tid := self._tok.token_to_id(self.eos_token)) is not None:
            ids.append(tid)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        # Chat templates already contain the special tokens as text.
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], *,
                            add_generation_prompt: bool = True, **extra: Any) -> str:
        if not self.chat_template:
            raise ValueError(f"{self.dir} has no chat_template in tokenizer_config.json")
        # Sandboxed like transformers: a template is data from the checkpoint, not trusted code.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        # transformers' tojson: plain json.dumps (jinja2's own escapes <, > and & as
        # \u003c..., which would change the prompt the model was trained on).
        env.filters["tojson"] = _tojson
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
