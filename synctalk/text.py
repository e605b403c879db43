"""Text pieces for sentence-streamed speech: `split_sentences(text)` cuts a text into sentences, long
sentences at clause boundaries and very long unpunctuated runs at word boundaries, so the first piece can
be synthesised and played while the rest is synthesised behind it. Joined with single spaces the pieces
give the text back (whitespace normalised)."""
from __future__ import annotations

import re

SENTENCE_CHARS = 180  # longest piece (a longer sentence is cut at clauses, then at words)
FIRST_CHARS = 90  # longest first piece: a short first piece starts the speech sooner

# a sentence ends at . ! ? or an ellipsis (with closing quotes or brackets) followed by whitespace,
# or at a line break
_SENTENCE_END = re.compile(r"(?<=[.!?\u2026])[\"')\]\u201d\u2019]*\s+|\n+")
_CLAUSE_END = re.compile(r"(?<=[,;:\u2014\u2013])\s+|\s+(?=[\u2014\u2013-]\s)")
_ABBREVIATIONS = {"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "vs.", "etc.", "e.g.", "i.e.", "no.", "jr.", "sr."}


def _sentences(text: str) -> list[str]:
    """Sentences of `text` (a known abbreviation such as "Dr." does not end one)."""
    out: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start:match.start()].strip()
        last_word = piece.rsplit(None, 1)[-1].lower() if piece else ""
        if last_word in _ABBREVIATIONS:
            continue
        if piece:
            out.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def _pack(parts: list[str], limit: int) -> list[str]:
    """Greedily join consecutive `parts` with spaces into pieces of at most `limit` characters (a part
    longer than the limit stays one piece)."""
    pieces: list[str] = []
    for part in parts:
        if pieces and len(pieces[-1]) + 1 + len(part) <= limit:
            pieces[-1] = f"{pieces[-1]} {part}"
        else:
            pieces.append(part)
    return pieces


def _words(text: str, limit: int) -> list[str]:
    """`text` cut at word boundaries into pieces of at most `limit` characters and of similar lengths (no
    short orphan at the end); a single longer word is cut hard."""
    words: list[str] = []
    for word in text.split():
        words.extend(word[i:i + limit] for i in range(0, len(word), limit))
    fewest = len(_pack(words, limit))
    target = min(limit, -(-len(" ".join(words)) // fewest))
    while len(pieces := _pack(words, target)) > fewest:
        target += 1
    return pieces


def _fit(sentence: str, limit: int) -> list[str]:
    """One sentence as pieces of at most `limit` characters: whole, else clauses, else words."""
    if len(sentence) <= limit:
        return [sentence]
    clauses = [c for c in _CLAUSE_END.split(sentence) if c.strip()]
    pieces: list[str] = []
    for clause in clauses:
        pieces.extend([clause.strip()] if len(clause.strip()) <= limit else _words(clause, limit))
    return _pack(pieces, limit)


def split_sentences(text: str, max_chars: int = SENTENCE_CHARS, first_chars: int = FIRST_CHARS) -> list[str]:
    """`text` as speakable pieces in order: sentences; a sentence longer than `max_chars` cut at clause
    boundaries (`, ; : -`), and a clause still longer cut at word boundaries; the first piece is held
    to `first_chars` the same way. Whitespace is normalised; an empty text gives []."""
    if max_chars < 1 or first_chars < 1:
        raise ValueError("max_chars and first_chars must be positive")
    text = " ".join(text.replace("\r", "\n").split(" ")).strip()
    pieces: list[str] = []
    for sentence in _sentences(text):
        sentence = " ".join(sentence.split())
        if not pieces and len(sentence) > first_chars:
            head = _fit(sentence, first_chars)
            pieces.append(head[0])
            pieces.extend(_pack(head[1:], max_chars))
            continue
        pieces.extend(_fit(sentence, max_chars))
    return pieces
