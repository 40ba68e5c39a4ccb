"""Build the CLIP BPE tokenizer files (vocab.json, merges.txt) for the shapes captions.

CLIP's tokenizer is a byte-level BPE whose word-final symbols carry a ``</w>`` suffix.
The vocabulary here holds the special tokens, every lowercase letter and digit (plain
and word-final, so any text still tokenizes, letter by letter) and the symbols of a BPE
merge table learned on the caption words until each word is one token;
``build_tokenizer(dir)`` checks this and fails loudly otherwise.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from .world import vocabulary

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bpe_tables(words: Iterable[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (token -> id) and ordered merge rules covering ``words``.

    The merges are learned by ordinary BPE training on the word list (most frequent
    adjacent pair first, ties broken alphabetically) until every word is one symbol;
    applying learned merges in rank order reproduces the training segmentation.
    """
    words = list(dict.fromkeys(words))
    for word in words:
        if not word or not word.isalpha() or word != word.lower():
            raise ValueError(f"caption words must be lowercase letters only, got {word!r}")
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    add(BOS)
    add(EOS)
    for ch in string.ascii_lowercase + string.digits:
        add(ch)
        add(ch + "</w>")
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[str] = []
    while any(len(s) > 1 for s in segs):
        counts: dict[tuple[str, str], int] = {}
        for s in segs:
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        add(best[0] + best[1])
        for k, s in enumerate(segs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[k] = out
    return vocab, merges


def build_tokenizer(directory: str | Path, model_max_length: int = 8, two_part: bool = False):
    """Write vocab.json + merges.txt + tokenizer config to ``directory``; return the tokenizer.

    ``model_max_length`` is the padded prompt length (BOS + words + EOS, padded with EOS).
    ``two_part=True`` adds the joining words of the two-part captions ("and", "that", "is");
    see ``world.vocabulary``.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe_tables(vocabulary(two_part))
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=model_max_length,
    )
    for word in vocabulary(two_part):
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(
                f"tokenizer splits caption word {word!r} into {len(ids)} tokens {ids}; "
                "the merge table in superdiff/shapes/tokenizer.py is incomplete"
            )
    tok.save_pretrained(directory)
    return tok
