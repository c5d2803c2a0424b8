"""Concept consistency graph (PASER's conflict filter).

Each sample is reduced to key phrases: the content-word uni- and bi-grams of its instruction/input
(question concepts) and of its output (answer concepts), plus whether the output is negated. The
graph keeps, for every question accepted so far (its concepts, word order included through the
bigrams), the answer concepts and polarities given to it. A new sample contradicts the graph when
it asks a question the graph already holds (the same question concepts) and
  * answers it with the opposite polarity about the same concepts ("Is the Earth flat?" "No, ..."
    accepted, now "Yes, the Earth is flat"), or
  * gives a short factual answer sharing no concept with the accepted answers ("capital of
    France" -> Paris, then Lyon).
Different questions never contradict each other: "Is Paris in Germany? No" after "Is Paris in
France? Yes" is consistent, and so are "3 + 5" and "3 - 5", "5 km to miles" and "5 miles to km".
Only short answers (at most `short_answer_words` content words) are read as assertions: long
open-ended answers legitimately differ and use negation freely, so they neither enter the graph nor
get rejected by it. The question concepts are those of the prompt's last `question_words` content
words, so a book-length prompt adds one bounded entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from data_selection.pool import Record

NEGATIONS = {"not", "no", "never", "false", "incorrect", "isn't", "aren't", "wasn't", "weren't", "doesn't",
             "don't", "didn't", "cannot", "can't", "won't", "neither", "nor", "none"}
# Words of every script (code-ish inner characters kept: c++, node.js); each character of scripts
# written without spaces (CJK, kana, hangul) on its own; and operators, which tell "3 + 5" from "3 - 5".
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}][\w'+#.-]*(?:[^\W_{_CJK}]|[+#])|[^\W_{_CJK}]|[+*/×÷=<>^%-]")


def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) - NEGATIONS


STOPWORDS = _stopwords()


def key_phrases(text: str, last: int | None = None) -> tuple[frozenset[str], bool]:
    """Content-word unigrams and adjacent bigrams (of the `last` content words only, when given),
    and whether a negation word occurs."""
    words = _WORD.findall(text.lower())
    negated = any(w in NEGATIONS for w in words)
    content = [w for w in words if w not in STOPWORDS and w not in NEGATIONS]
    if last is not None:
        content = content[-last:]
    bigrams = {f"{a} {b}" for a, b in zip(content, content[1:])}
    return frozenset(content) | frozenset(bigrams), negated


@dataclass
class ConceptGraph:
    short_answer_words: int = 12
    question_words: int = 128
    # question concepts -> [(answer concepts, polarity)] of the accepted samples that asked it
    answers: dict[frozenset[str], list[tuple[frozenset[str], int]]] = field(default_factory=dict)
    rejected: int = 0

    def check(self, record: Record) -> str | None:
        """Why the record contradicts the graph, or None when it is consistent."""
        q, a, negated = self._assertion(record)
        if a is None or not q:  # a long answer, or no question words to know the question by
            return None
        accepted = self.answers.get(q)
        if not accepted:
            return None
        polarity = -1 if negated else 1
        for concepts, seen in accepted:
            if seen != polarity and concepts & a:
                shared = sorted(concepts & a, key=lambda c: (" " in c, c))[0]
                return f"'{shared}' asserted with the opposite polarity by an accepted sample"
        new = _information(q, a)
        known = set().union(*(_information(q, concepts) for concepts, _ in accepted))
        if new and known and not (known & new):
            return "same question already answered differently"
        return None

    def _assertion(self, record: Record):
        """(question phrases, answer phrases, negated), with answer phrases None for long answers."""
        a, negated = key_phrases(record.response)
        if sum(1 for c in a if " " not in c) > self.short_answer_words:
            return None, None, False
        # The question is read from the end of the prompt (where recovery's truncation keeps it too).
        q, _ = key_phrases(record.prompt, last=self.question_words)
        return q, a, negated

    def add(self, record: Record) -> None:
        q, a, negated = self._assertion(record)
        if a is None or not q:
            return
        self.answers.setdefault(q, []).append((a, -1 if negated else 1))


def _information(q: frozenset[str], a: frozenset[str]) -> set[str]:
    """What an answer adds to its question: its unigrams the question does not contain."""
    return {c for c in a if " " not in c and c not in q}
