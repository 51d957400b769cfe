"""Text <-> token ids: tokenizer.json through `tokenizers`, the chat template through jinja2, and a
streaming decoder that only emits complete UTF-8 text."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
from tokenizers import Tokenizer as HFTokenizer

from packkv.errors import PackkvError


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, folder):
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise PackkvError(f"missing file: {path}")
        try:
            self.hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise PackkvError(f"cannot read {path}: {exc}") from exc
        config_path = folder / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = self.config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        self.chat_template = template

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, user_text: str) -> list[int]:
        """One user turn, rendered as the model was trained to see it, ready for the assistant's reply."""
        if not self.chat_template:
            raise PackkvError("--chat: this model's tokenizer_config.json has no chat_template")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise PackkvError(f"chat template: {message}")

        env.globals["raise_exception"] = raise_exception
        text = env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
            bos_token=_token_text(self.config.get("bos_token")) or "",
            eos_token=_token_text(self.config.get("eos_token")) or "")
        # The template already writes the special tokens it wants (BOS included), as transformers assumes.
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns generated ids into text pieces as they come. Byte-level BPE splits multi-byte characters
    across tokens, so a piece is held back while it ends in a partial UTF-8 character. Only a short
    window of ids is re-decoded per token (the ids since the last emitted piece, and the one before it
    for context), so streaming stays O(1) per token however long the text gets."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0      # ids[prefix:emitted] decode to text already emitted, kept as context
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._pending_text(final=False)

    def flush(self) -> str:
        return self._pending_text(final=True)

    def _pending_text(self, final: bool) -> str:
        decode = self.tokenizer.decode
        old = decode(self.ids[self.prefix:self.emitted])
        new = decode(self.ids[self.prefix:])
        if len(new) <= len(old) or (new.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.emitted = self.emitted, len(self.ids)
        return new[len(old):]
