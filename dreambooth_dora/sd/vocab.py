"""Regenerate the shipped CLIP tokenizer files: ``python -m dreambooth_dora.sd.vocab``.

The builtin tiny models need a real ``CLIPTokenizer`` but may not download one, so we ship a small
byte-level BPE vocabulary in the CLIP layout: the 256 byte symbols, their ``</w>`` (end-of-word)
forms, the learned merges, then ``<|startoftext|>`` and ``<|endoftext|>`` as the last two ids.
Merges are learned greedily from ``PROMPT_WORDS`` until every word is a single symbol. Learning
(rather than hand-writing one merge chain per word) keeps merge ranks consistent across words:
a hand-written ``h o`` merge could outrank ``p h`` and split ``photo`` into unmergeable pieces.
Any other text still tokenizes, falling back to byte symbols.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Words a DreamBooth prompt typically uses; each becomes one token (tests check this).
_PROMPT_WORDS_TEXT = """
    a an the of on in with at by for from to and or is it its this that under over near next behind
    photo photograph picture image portrait closeup close up shot view
    sks ohwx zwx subject instance class
    dog dogs cat cats person people man woman boy girl child baby face
    toy toys robot car house tree flower bird ball cup mug chair table book shoe hat bag bear teddy
    red blue green yellow white black orange purple pink brown gray grey gold silver
    star circle square triangle ring cross heart diamond stripe stripes striped dot dots line shape shapes tone
    background foreground scene style painting drawing sketch cartoon render art anime watercolor
    oil pencil digital realistic cinematic lighting soft sharp focus blurry
    small large big tiny top bottom left right center middle corner
    plain dark light bright wooden metal glass plastic
    beach forest city street snow water sky grass room garden mountain night day sunset
    wearing sitting standing running lying
    high low quality detailed bad ugly one two three
"""
PROMPT_WORDS: tuple[str, ...] = tuple(_PROMPT_WORDS_TEXT.split())


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in CLIP's id order (transformers' ``bytes_to_unicode`` mapping)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """Greedy BPE over ``words`` until each word is one symbol; ties break lexicographically."""
    # Each word starts as characters, the last one carrying the end-of-word marker (as CLIP does).
    # The prompt words are ASCII letters, which the byte-level mapping leaves unchanged.
    segmented = [[*word[:-1], word[-1] + "</w>"] for word in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for symbols in segmented for pair in itertools.pairwise(symbols))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for i, symbols in enumerate(segmented):
            merged: list[str] = []
            j = 0
            while j < len(symbols):
                if j + 1 < len(symbols) and (symbols[j], symbols[j + 1]) == best:
                    merged.append(symbols[j] + symbols[j + 1])
                    j += 2
                else:
                    merged.append(symbols[j])
                    j += 1
            segmented[i] = merged


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in CLIP's layout; the two special tokens take the last ids."""
    base = byte_symbols()
    tokens = base + [symbol + "</w>" for symbol in base] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def main() -> None:
    merges = learn_merges(PROMPT_WORDS)
    TOKENIZER_DIR.mkdir(exist_ok=True)
    vocab = json.dumps(build_vocab(merges), ensure_ascii=False)
    (TOKENIZER_DIR / "vocab.json").write_text(vocab + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (TOKENIZER_DIR / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(merges)} merges for {len(set(PROMPT_WORDS))} words to {TOKENIZER_DIR}")


if __name__ == "__main__":
    main()
