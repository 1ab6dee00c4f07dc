"""CLIP's tokenizer: text -> 77 token ids, byte-level BPE over the released 49408-token vocabulary.

    segany.tokenize(["a dog", "a cat"])  ->  LongTensor (2, 77): <start_of_text> ids... <end_of_text> 0 0 ...

The clean-up is the released one: ftfy's mojibake repair, HTML entities unescaped twice, runs of
whitespace collapsed, lower case. Words are split with the released pattern (contractions, letter runs,
single digits, runs of other symbols), each word's UTF-8 bytes mapped to printable characters and merged
by the vocabulary's ranked pairs. Text longer than the context is cut and still ends with <end_of_text>.
ftfy and regex (for \\p{L}) come with `pip install segany[text]`.
"""
from __future__ import annotations

import gzip
import html
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

VOCABULARY = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
CONTEXT_LENGTH = 77
# The vocabulary file lists merges after a header line; the released model uses the first
# 49152 - 256 - 2 of them: 256 byte tokens, 256 end-of-word byte tokens, the merges, and 2 specials.
N_MERGES = 49152 - 256 - 2
SOT, EOT = "<start_of_text>", "<end_of_text>"


class TextDependencyError(ImportError):
    """ftfy or regex is missing: they come with the optional extra segany[text]."""


class VocabularyError(ValueError):
    """The BPE vocabulary file is missing or damaged."""


def _text_modules():
    try:
        import ftfy
        import regex
    except ImportError as exc:
        raise TextDependencyError(
            f"text prompts need the packages ftfy and regex ({exc.name} is missing): pip install 'segany[text]'"
        ) from None
    return ftfy, regex


@lru_cache()
def byte_to_unicode() -> Dict[int, str]:
    """A reversible map from the 256 byte values to printable characters (BPE never sees whitespace or
    control characters): printable Latin-1 bytes map to themselves, the rest to code points from 256 up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # in this order: the vocabulary's first 256 ids are the printable bytes, then the rest


def clean(text: str) -> str:
    ftfy, _ = _text_modules()
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    def __init__(self, vocabulary: Union[str, os.PathLike, None] = None, context_length: int = CONTEXT_LENGTH) -> None:
        _, regex = _text_modules()
        path = Path(vocabulary) if vocabulary is not None else VOCABULARY
        merges = _read_merges(path)
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [SOT, EOT]
        self.encoder: Dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: Dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.ranks: Dict[Tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self.pattern = regex.compile(
            rf"{SOT}|{EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
        )
        self._cache: Dict[str, List[str]] = {SOT: [SOT], EOT: [EOT]}

    def bpe(self, word: str) -> List[str]:
        """One word (already byte-mapped) -> its vocabulary tokens, the last one marked end-of-word."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, N_MERGES + 1))
            if best not in self.ranks:
                break
            merged: List[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> List[int]:
        """The ids of a text, without start/end tokens or padding."""
        ids: List[int] = []
        for word in self.pattern.findall(clean(text)):
            mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytes(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        """(N, context_length) int64: <start_of_text>, the ids, <end_of_text>, zeros; cut to fit."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def _read_merges(path: Path) -> List[Tuple[str, str]]:
    if not path.is_file():
        raise VocabularyError(
            f"CLIP's BPE vocabulary is missing: {path} not found (it ships inside segany; reinstall segany, "
            f"or pass the bpe_simple_vocab_16e6.txt.gz of OpenAI's CLIP)"
        )
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise VocabularyError(f"CLIP's BPE vocabulary {path} is damaged ({exc})") from None
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise VocabularyError(f"{path} is not CLIP's BPE vocabulary (expected {N_MERGES} merge lines)")
    return merges  # type: ignore[return-value]


@lru_cache(maxsize=2)
def _default_tokenizer(context_length: int) -> ClipTokenizer:
    return ClipTokenizer(context_length=context_length)


def tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP token ids (N, context_length) for one text or a list, as open_clip.tokenize returns them."""
    return _default_tokenizer(context_length)(texts)
