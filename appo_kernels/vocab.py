"""Per-tokenizer lookup tables over the vocabulary (docs/ops.md, vocab_flags): which token ids are
whitespace-only or punctuation-only, built once from the vocabulary pieces, indexed by token ids
on any device (`eligible = mask & ~flags.is_whitespace[ids]`)."""

from __future__ import annotations

import re
import string
import unicodedata
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from appo_kernels._checks import int_arg


class VocabFlags(NamedTuple):
    is_whitespace: Tensor  # bool [V]: the token's text is non-empty and all whitespace
    is_punct: Tensor  # bool [V]: non-whitespace characters exist and are all punctuation


SENTENCEPIECE_SPACE = "\u2581"  # '▁': SentencePiece writes a leading space as this character
BYTE_LEVEL_SPACE = "\u0120"  # 'Ġ': byte-level BPE (GPT-2, Llama 3, Qwen) writes a space as this
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback pieces


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves and
    the other bytes, in increasing order, for chr(256), chr(257), ... ('Ġ' = space, 'Ċ' = \\n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in alphabet.values()]
    alphabet.update({chr(256 + k): b for k, b in enumerate(others)})
    return alphabet


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def _piece_text(piece: str, byte_level: bool) -> str:
    """The text a vocabulary piece stands for (bytes that are not valid UTF-8 alone become
    U+FFFD, which is neither whitespace nor punctuation)."""
    if byte_level:
        if all(c in BYTE_LEVEL_ALPHABET for c in piece):
            return bytes(BYTE_LEVEL_ALPHABET[c] for c in piece).decode("utf-8", errors="replace")
        return piece  # an added token, stored as plain text
    match = BYTE_FALLBACK.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)]).decode("utf-8", errors="replace")
    return piece.replace(SENTENCEPIECE_SPACE, " ")


def _token_texts(tokenizer, n_ids: int) -> list[str]:
    ids = list(range(n_ids))
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        return [tokenizer.decode([i]) for i in ids]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    # byte-level BPE marks word starts with 'Ġ', SentencePiece with '▁': the majority decides
    n_byte_level = sum(1 for p in pieces if p is not None and p.startswith(BYTE_LEVEL_SPACE))
    n_sentencepiece = sum(1 for p in pieces if p is not None and p.startswith(SENTENCEPIECE_SPACE))
    byte_level = n_byte_level > n_sentencepiece
    return [tokenizer.decode([i]) if p is None else _piece_text(p, byte_level)
            for i, p in zip(ids, pieces)]


def _is_whitespace(text: str) -> bool:
    return text != "" and text.isspace()


def _is_punct_char(c: str) -> bool:
    return c in string.punctuation or unicodedata.category(c).startswith("P")


def _is_punct(text: str) -> bool:
    rest = [c for c in text if not c.isspace()]
    return bool(rest) and all(_is_punct_char(c) for c in rest)


def _tokenizer_size(tokenizer) -> int:
    if hasattr(tokenizer, "__len__"):
        return len(tokenizer)
    size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int):
        return size
    raise TypeError("tokenizer must define __len__ or an int vocab_size (or pass vocab_size=)")


def vocab_flags(tokenizer, *, vocab_size: Optional[int] = None, device=None) -> VocabFlags:
    """Whitespace-only and punctuation-only lookup tables over a tokenizer's vocabulary.

    Build once per tokenizer (a Python pass over the vocabulary) and index with token ids:
    `eligible = mask & ~flags.is_whitespace[token_ids]`.

    The text of id i is, for a Hugging Face tokenizer (anything with `convert_ids_to_tokens`),
    its vocabulary piece with the tokenizer's markers resolved: byte-level BPE pieces are mapped
    back to their bytes ('Ġ' = space, 'Ċ' = newline, 'ĉ' = tab) and decoded as UTF-8;
    SentencePiece's '▁' is a space and its byte-fallback pieces `<0xNN>` are the byte NN. The
    scheme is byte-level when more pieces start with 'Ġ' than with '▁'. Pieces are used rather
    than `decode([i])` because decoders strip a leading space, which would turn '▁' into ''.
    Any other object needs `decode(list[int]) -> str` and `__len__` or `vocab_size`; its text is
    `decode([i])`.

    - `is_whitespace[i]`: the text is non-empty and every character is whitespace
      (`str.isspace`: space, \\t, \\n, \\r, \\v, \\f, U+0085, U+00A0, U+2000–U+200A, ...).
    - `is_punct[i]`: after removing whitespace the text is non-empty and every character is ASCII
      punctuation (`string.punctuation`, which includes symbols such as `$+<=>^|~`) or in a
      Unicode punctuation category (P*). Whitespace-only tokens are not punctuation; special
      tokens such as `<|im_end|>` (letters inside) and undecodable partial UTF-8 bytes are
      neither.

    Args:
        tokenizer: a Hugging Face tokenizer or any object with `decode` and a size.
        vocab_size: length of the tables, default the tokenizer's size (`len(tokenizer)`,
            which counts added tokens). Pass the model's vocabulary size when it is padded
            beyond the tokenizer; ids past the tokenizer are neither.
        device: where the tables live (default CPU).

    Returns:
        VocabFlags(is_whitespace, is_punct), bool `[vocab_size]`.
    """
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer must have a decode(list[int]) method, got "
                        f"{type(tokenizer).__name__}")
    known = _tokenizer_size(tokenizer)
    size = known if vocab_size is None else vocab_size
    int_arg("vocab_size", size, low=0)
    texts = _token_texts(tokenizer, min(size, known))
    is_whitespace = torch.zeros(size, dtype=torch.bool)
    is_punct = torch.zeros(size, dtype=torch.bool)
    is_whitespace[:len(texts)] = torch.tensor([_is_whitespace(t) for t in texts], dtype=torch.bool)
    is_punct[:len(texts)] = torch.tensor([_is_punct(t) for t in texts], dtype=torch.bool)
    return VocabFlags(is_whitespace.to(device), is_punct.to(device))
