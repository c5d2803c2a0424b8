"""Concept consistency graph (PASER's conflict filter).

Each sample is reduced to key phrases: the content-word uni- and bi-grams of its instruction/input
(question concepts) and of its output (answer concepts), plus whether the output is negated. The
graph links every question concept to every answer concept of the samples accepted so far, with
the polarity of that link. A new sample contradicts the graph when
  * it asserts a question->answer link the graph holds with the opposite polarity
    ("X is Y" accepted, now "X is not Y"), or
  * it asks a question the graph already answered (same question concepts) with a short factual
    answer sharing no concept with the accepted answers ("capital of France" -> Paris, then Lyon).
Only short answers (at most `short_answer_words` content words) are read as assertions: long
open-ended answers legitimately differ and use negation freely, so they neither enter the graph nor
get rejected by it. Edges stay bounded by (question phrases x short-answer phrases) per sample,
the question phrases those of the prompt's last `question_words` content words.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from data_selection.pool import Record

NEGATIONS = {"not", "no", "never", "false", "incorrect", "isn't", "aren't", "wasn't", "weren't", "doesn't",
             "don't", "didn't", "cannot", "can't", "won't", "neither", "nor", "none"}
# Words of every script (a question in Russian has concepts too), with code-ish inner characters.
_WORD = re.compile(r"[^\W_][\w'+#.-]*(?:[^\W_]|[+#])|[^\W_]")


def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) - NEGATIONS


STOPWORDS = _stopwords()


def key_phrases(text: str, last: int | None = None) -> tuple[frozenset[str], bool]:
    """Content-word unigrams and adjacent bigrams (of the `last` content words only, when given),
    and whether a negation word occurs."""
    words = _WORD.findall(text.lower())
    negated = any(w in NEGATIONS for w in words)
    # One-letter words carry nothing ("a", "s"); one digit does ("4 times 6" is not "3 times 6").
    content = [w for w in words if w not in STOPWORDS and w not in NEGATIONS and (len(w) > 1 or w.isdigit())]
    if last is not None:
        content = content[-last:]
    bigrams = {f"{a} {b}" for a, b in zip(content, content[1:])}
    return frozenset(content) | frozenset(bigrams), negated


@dataclass
class ConceptGraph:
    short_answer_words: int = 12
    question_words: int = 128
    edges: dict[tuple[str, str], int] = field(default_factory=dict)  # (question, answer) -> +1 / -1
    answers: dict[frozenset[str], set[str]] = field(default_factory=lambda: defaultdict(set))
    rejected: int = 0

    def check(self, record: Record) -> str | None:
        """Why the record contradicts the graph, or None when it is consistent."""
        q, a, negated = self._assertion(record)
        if a is None:
            return None
        polarity = -1 if negated else 1
        for qc in q:
            for ac in a:
                seen = self.edges.get((qc, ac))
                if seen is not None and seen != polarity:
                    return f"'{qc}' -> '{ac}' contradicts an accepted sample"
        key, new = self._answer_key(q, a)
        # A question with no content words says nothing about which question it is: never "the same".
        if key and self.answers.get(key) and new and not (self.answers[key] & new):
            return "same question already answered differently"
        return None

    def _assertion(self, record: Record):
        """(question phrases, answer phrases, negated), with answer phrases None for long answers."""
        a, negated = key_phrases(record.response)
        if sum(1 for c in a if " " not in c) > self.short_answer_words:
            return None, None, False
        # The question is read from the end of the prompt (where recovery's truncation keeps it too):
        # a book-length prompt would otherwise add millions of edges for one short answer.
        q, _ = key_phrases(record.prompt, last=self.question_words)
        return q, a, negated

    def add(self, record: Record) -> None:
        q, a, negated = self._assertion(record)
        if a is None:
            return
        polarity = -1 if negated else 1
        for qc in q:
            for ac in a:
                self.edges.setdefault((qc, ac), polarity)
        key, new = self._answer_key(q, a)
        if key:
            self.answers[key] |= new

    @staticmethod
    def _answer_key(q: frozenset[str], a: frozenset[str]) -> tuple[frozenset[str], set[str]]:
        """The question's unigrams, and what the answer adds to them (its information)."""
        key = frozenset(c for c in q if " " not in c)
        return key, {c for c in a if " " not in c and c not in key}
