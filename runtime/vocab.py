"""Tokenization and the vocabulary: one definition for training, export and the runtime."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

NULL, START, END, UNK = "<NULL>", "<START>", "<END>", "<UNK>"
SPECIALS = (NULL, START, END, UNK)  # ids 0..3, as in the course's coco.pt
MAX_WORDS = 15  # words per caption; with <START> and <END> a caption row is 17 ids

_PUNCT = re.compile(r"[^\w\s]")


def tokenize(text: str, max_words: int = MAX_WORDS) -> list[str]:
    """Lowercase, punctuation stripped, split on whitespace, at most `max_words` words."""
    return _PUNCT.sub(" ", text.lower()).split()[:max_words]


@dataclass
class Vocab:
    """Index <-> token; the four specials keep the ids coco.pt gives them."""

    idx_to_token: list[str]
    token_to_idx: dict[str, int] = field(init=False)

    def __post_init__(self):
        for i, tok in enumerate(SPECIALS):
            if i >= len(self.idx_to_token) or self.idx_to_token[i] != tok:
                raise ValueError(
                    f"vocabulary must start with {list(SPECIALS)}, got {self.idx_to_token[:4]}"
                )
        self.token_to_idx = {t: i for i, t in enumerate(self.idx_to_token)}
        if len(self.token_to_idx) != len(self.idx_to_token):
            raise ValueError("vocabulary has duplicate tokens")

    null_id = property(lambda self: 0)
    start_id = property(lambda self: 1)
    end_id = property(lambda self: 2)
    unk_id = property(lambda self: 3)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> "Vocab":
        """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(w for c in captions for w in tokenize(c))
        words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + [w for w in words if w not in SPECIALS])

    def encode(self, text: str, length: int = MAX_WORDS + 2) -> list[int]:
        """`<START> w1 .. wk <END> <NULL>...` as ids, `length` long; unknown words become `<UNK>`."""
        ids = [self.start_id] + [self.token_to_idx.get(w, self.unk_id) for w in tokenize(text, length - 2)]
        ids.append(self.end_id)
        return ids + [self.null_id] * (length - len(ids))

    def word_ids(self, ids: Sequence[int]) -> list[int]:
        """The word ids of a sampled sequence: up to its first `<END>`, without `<NULL>` and `<START>`."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i not in (self.null_id, self.start_id):
                out.append(i)
        return out

    def words(self, ids: Sequence[int]) -> list[str]:
        return [self.idx_to_token[i] for i in self.word_ids(ids)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.words(ids))
