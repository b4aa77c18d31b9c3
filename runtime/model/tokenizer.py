"""Text ↔ tokens for a model directory: `tokenizer.json` (the tokenizers library) and chat templates.

Chat templates come from `tokenizer_config.json` (`chat_template`, a string or a list of named
templates) or from `chat_template.jinja` beside it (how transformers >= 5 saves them), rendered with a
sandboxed jinja2 environment as transformers renders them.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from functools import cached_property
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ember.provider.domain.gguf_tokenizer import byte_alphabet
from ember.provider.domain.model_files import ModelFilesError


def _special_token_content(value) -> str | None:
    # tokenizer_config.json writes a special token as its text or as {"content": text, ...}
    return value.get("content") if isinstance(value, dict) else value


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict, chat_template: str | None):
        self.tokenizer = tokenizer
        self.bos_token = _special_token_content(config.get("bos_token"))
        self.eos_token = _special_token_content(config.get("eos_token"))
        self.chat_template = chat_template
        self._template = None
        if chat_template is not None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, directory: str | Path) -> "TextTokenizer":
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists():
            raise ModelFilesError(f"{path} is missing: a model directory needs tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise ModelFilesError(f"{path} is not a tokenizers file: {exc}") from None
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        return cls(tokenizer, config, template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch, of one text: it lets go of the GIL while it works, where encode holds it throughout (a
        # megabyte prompt would stop the server's event loop and the engine thread for seconds)
        return self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for: its piece's length bounds it (a byte-level piece
        spells one byte a character, a byte-fallback piece a byte in six), special tokens' included."""
        return max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (what logprobs report)."""
        return self.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """One token's real bytes: a token holding part of a character decodes to U+FFFD, but its bytes are exact
        (byte-level vocabularies spell bytes in GPT-2's alphabet; SentencePiece's byte fallback as <0xNN>)."""
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id not in self._added_ids:
            if self._byte_level and set(piece) <= self._alphabet.keys():
                return bytes(self._alphabet[c] for c in piece)
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                return bytes([int(piece[3:5], 16)])
        return self.token_text(token_id).encode()

    @cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in self.tokenizer.to_str()

    @cached_property
    def _alphabet(self) -> dict[str, int]:
        return {char: byte for byte, char in byte_alphabet().items()}

    @cached_property
    def _added_ids(self) -> set[int]:
        return set(self.tokenizer.get_added_tokens_decoder())

    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders `tools` (and tool calls) itself."""
        return self.chat_template is not None and "tools" in self.chat_template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    continue_final_message: bool = False) -> str:
        """The conversation as the template writes it. With `continue_final_message` (transformers' option) the last
        message is left open for the model to go on with: the text ends with that message's own."""
        if self._template is None:
            raise ValueError("messages: this model has no chat template; use the completions API")
        if continue_final_message:
            return self._continued(messages, tools)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **({"tools": tools} if tools else {}),
            )
        except TemplateError as exc:
            # The template's own message (e.g. "roles must alternate"), never the conversation's text.
            raise ValueError(f"messages: the chat template refused them: {exc.message}") from None

    def _continued(self, messages: list[dict], tools: list[dict] | None) -> str:
        # A marker after the message's text finds where it ends in the rendering: looking for the text itself (as
        # transformers does) can land on the same letters in the template's own markup after it.
        text = messages[-1].get("content")
        marker = f"<ember-continue-{uuid.uuid4().hex}>"
        if isinstance(text, str):
            rendered = self.render_chat([*messages[:-1], {**messages[-1], "content": text + marker}], False, tools)
            before, found, after = rendered.partition(marker)
            # a template may trim the message's leading space; one that rewrites it (drops reasoning, say) leaves
            # nothing to continue the message from
            if found and marker not in after and before.endswith(text.lstrip()):
                return before
        raise ValueError(f"messages: the last message is the {messages[-1].get('role')}'s, to be continued, and this "
                         f"model's chat template cannot continue it: it does not write the message's text as it is")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, continue_final_message: bool = False) -> list[int]:
        # The template already writes BOS, so encoding must not add another (as transformers does).
        return self.encode(self.render_chat(messages, add_generation_prompt, tools, continue_final_message),
                           add_special_tokens=False)


def _raise(message: str):
    raise TemplateError(message)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, holding back bytes of an unfinished character."""

    CONTEXT = 5  # prompt tokens kept so the first output token decodes with its leading space

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset : self.read_offset])
        after = decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back (the bytes of an unfinished character, as U+FFFD): at the end, the text must
        be what decoding the generated ids gives."""
        decode = self.tokenizer.decode
        held = decode(self.ids[self.prefix_offset:])[len(decode(self.ids[self.prefix_offset : self.read_offset])):]
        self.prefix_offset = self.read_offset = len(self.ids)
        return held
