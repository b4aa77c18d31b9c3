"""A GGUF file's tokenizer, rebuilt as a `tokenizer.json` (the tokenizers library) with its config files.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, the merges, each token's type and the
special token ids as metadata, and names the pre-tokenizer (`tokenizer.ggml.pre`) whose splitting rule it
applies in C++. Ember rebuilds byte-level BPE vocabularies (`tokenizer.ggml.model` = gpt2: Llama 3, Qwen2,
SmolLM) with the splitting rule of each named pre-tokenizer, as the model's own tokenizer.json spells it,
and SentencePiece vocabularies (`llama`: Llama 2, Mistral 7B, Gemma, Phi-3) as BPE with byte fallback whose
merges come from the pieces' scores, as transformers' GGUF loader builds them (each architecture's flavour:
where the "▁" prefix comes from, Gemma's merge order); a pre-tokenizer or vocabulary type it does not know is
refused, never approximated, because a wrong split gives a model token sequences it was never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ember.provider.domain.model_files import ModelFilesError

# The splitting rules of the published tokenizer.json files these vocabularies come with.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool = True) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"), _byte_level(False)])


# tokenizer.ggml.pre → the pre-tokenizer (llama.cpp's names; several models share a rule)
PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt2": _byte_level,
    # SmolLM's tokenizer.json: every digit alone, then GPT-2's split
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _split_then_bytes(_QWEN2_SPLIT),
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# tokenizer.ggml.model → what Ember rebuilds it as
VOCABULARY_MODELS = {"gpt2": "byte-level BPE (Llama 3, Qwen2, SmolLM)",
                     "llama": "SentencePiece (Llama 2, Mistral 7B, Gemma, Phi-3)"}
# general.architecture → how its SentencePiece vocabulary splits text (transformers' GGUF builders; others: Llama's)
SENTENCEPIECE_FLAVOURS = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3"}
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space
# Ids that end a turn besides EOS (Llama 3's <|eot_id|>, <|eom_id|>): generation stops on all of them.
END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


@cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, in which byte-level vocabularies write their tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces of the vocabulary,
    the best-scored piece's first (then the longer left part), as transformers' `generate_merges` orders them."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for piece, score in dict(zip(tokens, scores)).items():
        splits = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                  if piece[:i] in vocab and piece[i:] in vocab]
        merges.extend(sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


@dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer metadata of a GGUF file, checked; `metadata` maps a key to its value."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # empty for a SentencePiece vocabulary without them: derived from `scores`
    scores: list[float]
    flavour: str  # a SentencePiece vocabulary's: "llama", "gemma" or "phi3"
    add_space_prefix: bool
    special_ids: dict[str, int]  # bos/eos/unk/pad → id, where the file names one
    end_of_turn_ids: tuple[int, ...]
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    @classmethod
    def from_metadata(cls, metadata: dict, source: str) -> "GGUFVocabulary":
        def need(key: str):
            if key not in metadata:
                raise ModelFilesError(f"{source}: metadata {key} is missing: Ember rebuilds the tokenizer from it")
            return metadata[key]

        model = need("tokenizer.ggml.model")
        if model not in VOCABULARY_MODELS:
            raise ModelFilesError(f"{source}: tokenizer.ggml.model {model!r} is not supported; Ember rebuilds "
                                  + ", ".join(f"{name!r} ({kind})" for name, kind in VOCABULARY_MODELS.items()))
        pre = metadata.get("tokenizer.ggml.pre", "default")
        if model == "gpt2" and pre not in PRE_TOKENIZERS:
            raise ModelFilesError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported; Ember knows the splitting "
                                  f"rules of {', '.join(sorted(PRE_TOKENIZERS))}")
        tokens = need("tokenizer.ggml.tokens")
        # A SentencePiece vocabulary rarely lists merges: they follow from the scores, best piece first.
        merges = need("tokenizer.ggml.merges") if model == "gpt2" else metadata.get("tokenizer.ggml.merges") or []
        scores = (metadata.get("tokenizer.ggml.scores") or []) if merges else need("tokenizer.ggml.scores")
        if not merges and len(scores) != len(tokens):
            raise ModelFilesError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise ModelFilesError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
        specials = {}
        for name in ("bos", "eos", "unknown", "padding"):
            key = f"tokenizer.ggml.{name}_token_id"
            if key in metadata:
                if not 0 <= metadata[key] < len(tokens):
                    raise ModelFilesError(f"{source}: {key} {metadata[key]} is outside the {len(tokens)}-token vocabulary")
                specials[name] = int(metadata[key])
        if "eos" not in specials:
            need("tokenizer.ggml.eos_token_id")
        end_of_turn = tuple(int(metadata[k]) for k in END_OF_TURN_KEYS if k in metadata and metadata[k] < len(tokens))
        flavour = SENTENCEPIECE_FLAVOURS.get(metadata.get("general.architecture"), "llama")
        # llama.cpp starts a SentencePiece text with BOS, and with a space, unless the file says otherwise
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", model == "llama"))
        return cls(model, pre, list(tokens), [int(t) for t in types], list(merges), [float(x) for x in scores],
                   flavour, bool(metadata.get("tokenizer.ggml.add_space_prefix", True)), specials, end_of_turn,
                   add_bos, bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
                   metadata.get("tokenizer.chat_template"))

    def token(self, name: str) -> str | None:
        index = self.special_ids.get(name)
        return None if index is None else self.tokens[index]

    def build(self) -> Tokenizer:
        """The tokenizer these tokens, merges and rules describe."""
        tokenizer = self._sentencepiece() if self.model == "llama" else self._byte_level()
        # Control tokens (<|im_start|>) and the ones the file names (BOS, EOS, <unk>, padding) stay whole and are
        # skipped when decoding; user-defined ones (<think>) stay whole and are text. In a byte-level vocabulary a
        # control token outside the byte alphabet is a mislabel llama.cpp writes: skipped.
        letters = set(byte_alphabet().values()) if self.model == "gpt2" else None
        named = set(self.special_ids.values())
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                      for index, (t, kind) in enumerate(zip(self.tokens, self.token_types))
                                      if (kind == CONTROL or index in named)
                                      and (letters is None or set(t) <= letters)])
        tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                              for t, kind in zip(self.tokens, self.token_types) if kind == USER_DEFINED])
        tokenizer.post_processor = self._post_processor()
        return tokenizer

    def _byte_level(self) -> Tokenizer:
        alphabet = byte_alphabet()
        letters = set(alphabet.values())
        # A byte-level vocabulary spells tokens in the byte alphabet; one written in plain text is re-spelt.
        spelt = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode()) for t in self.tokens]
        vocab = {token: index for index, token in enumerate(spelt)}
        merges = [tuple(merge.split(" ", 1)) for merge in self.merges]
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tokenizer.pre_tokenizer = PRE_TOKENIZERS[self.pre]()
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer

    def _sentencepiece(self) -> Tokenizer:
        """SentencePiece as BPE over its pieces, unknown characters spelt as <0xNN> byte tokens, as transformers'
        GGUF loader builds it for the architecture: Llama's and Phi-3's put "▁" before the text (Llama's before
        its first part only), Gemma's does not, and Gemma stores runs of spaces as spaces, with merges that
        follow the file's order rather than its scores."""
        tokens, order = self.tokens, self.scores
        if self.flavour == "gemma":
            tokens = [SPACE * len(t) if len(t) > 1 and not t.strip(" ") else t for t in tokens]
            order = [-float(index) for index in range(len(tokens))]
        vocab = {token: index for index, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in self.merges] or merges_from_scores(tokens, order)
        unk = self.token("unknown") if self.flavour == "gemma" else None
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.flavour == "gemma":
            tokenizer.normalizer = normalizers.Replace(" ", SPACE)
            tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        elif self.flavour == "phi3" and self.add_space_prefix:
            tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        else:
            # add_space_prefix false (llama.cpp honours it; transformers ignores it) puts no "▁" before the text
            scheme = "first" if self.add_space_prefix else "never"
            tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme=scheme, split=False)
        if self.flavour != "gemma" and self.add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))  # the "▁" the encoder put before the text
        tokenizer.decoder = decoders.Sequence(steps)
        return tokenizer

    def _post_processor(self) -> processors.PostProcessor:
        first, second, specials = "$A:0", "$B:1", []
        if self.add_bos and self.token("bos") is not None:
            bos = self.token("bos")
            first, second = f"{bos}:0 {first}", f"{bos}:1 {second}"
            specials.append((bos, self.special_ids["bos"]))
        if self.add_eos:
            eos = self.token("eos")
            first, second = f"{first} {eos}:0", f"{second} {eos}:1"
            specials.append((eos, self.special_ids["eos"]))
        return processors.TemplateProcessing(single=first, pair=f"{first} {second}", special_tokens=specials)

    def tokenizer_config(self, context_length: int) -> dict:
        """tokenizer_config.json: the special tokens and the chat template, as transformers writes them."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context_length,
                  "add_bos_token": self.add_bos, "add_eos_token": self.add_eos,
                  "bos_token": self.token("bos"), "eos_token": self.token("eos"), "unk_token": self.token("unknown"),
                  "pad_token": self.token("padding")}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return {k: v for k, v in config.items() if v is not None}

    def generation_config(self) -> dict:
        eos = [self.special_ids["eos"], *(i for i in self.end_of_turn_ids if i != self.special_ids["eos"])]
        config = {"bos_token_id": self.special_ids.get("bos"), "eos_token_id": eos[0] if len(eos) == 1 else eos,
                  "pad_token_id": self.special_ids.get("padding")}
        return {k: v for k, v in config.items() if v is not None}
