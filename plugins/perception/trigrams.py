"""Character-trigram similarities of the perception plugin's hashing embedder.

A text's vector is the unit-length count vector of the hashed character trigrams of its
words; a tag's similarity is the cosine of that vector to the tag description's. The
per-call path (:func:`_approximate_similarities`) adds cached per-word sums; the exact path
(:func:`_index_similarities`) reproduces :func:`trigram_similarities` bit for bit. See
:mod:`aiwfe.plugins.perception.plugin` for how perceive chooses between them.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter
from collections.abc import Callable
from itertools import chain
from operator import itemgetter, mul

__all__ = ["CACHED_WORD_MAX", "trigram_index", "trigram_similarities", "trigram_vector"]

_WORD = re.compile(r"[A-Za-zÀ-ÿ0-9_+#.-]+")
# The characters outside _WORD's class whose lower-case form has characters inside it (İ, Ÿ,
# ẞ, Kelvin K, Ångström Å; a test checks every code point): in a text without them the words
# of text.lower() are the lower-cased words of text, so one tokenisation serves both.
_LOWER_JOINS = re.compile("[\u0130\u0178\u1e9e\u212a\u212b]")


def trigram_vector(text: str) -> dict[int, float]:
    """A unit-length sparse vector of hashed character trigrams of the words of ``text``."""
    return _unit_vector(_tokens(text)[2])


def _unit_vector(words: list[str]) -> dict[int, float]:
    """:func:`trigram_vector` of the text whose stripped lower-case words are ``words``."""
    vec: dict[int, float] = {}
    for w in words:
        for h in _word_trigrams(w):
            vec[h] = vec.get(h, 0.0) + 1.0
    norm = math.sqrt(sum(v * v for v in vec.values()))
    return {k: v / norm for k, v in vec.items()} if norm else vec


#: Words longer than this are not cached: the caches are bounded by entries (2^14 each), and
#: a client could otherwise fill them with very long words (worst case now ≈ 20 MB each).
CACHED_WORD_MAX = 32


def _word_trigrams(word: str) -> tuple[int, ...]:
    """The hashed trigrams of one lower-cased word, its dots stripped (cached, bounded:
    hashing was most of perceive's CPU; words over :data:`CACHED_WORD_MAX` characters are
    hashed each time)."""
    if len(word) > CACHED_WORD_MAX:
        return _hash_trigrams(word)
    return _cached_trigrams(word)


def _hash_trigrams(word: str) -> tuple[int, ...]:
    padded = f"#{word}#"
    return tuple(
        int.from_bytes(hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest(), "little")
        for i in range(len(padded) - 2)
    )


_cached_trigrams = functools.lru_cache(maxsize=1 << 14)(_hash_trigrams)


def _tokens(text: str) -> tuple[list[str], list[str], list[str]]:
    """The words of ``text``; the same lower-cased with dots stripped (keywords, stopwords,
    intent); and the words of ``text.lower()`` with dots stripped (trigrams) — the previous
    list itself unless the text holds a character of ``_LOWER_JOINS``."""
    words = _WORD.findall(text)
    lower = [w.lower().strip(".") for w in words]
    if text.isascii() or not _LOWER_JOINS.search(text):
        return words, lower, lower
    return words, lower, [w.strip(".") for w in _WORD.findall(text.lower())]


def trigram_index(vectors: dict[str, dict[int, float]]) -> dict[int, tuple[tuple[str, float], ...]]:
    """Trigram → (tag, weight) of every tag vector holding it: :func:`trigram_similarities`
    then touches only the tags that share a trigram with the text, instead of a cosine against
    every tag (that scan was ~60 % of a perceive call's CPU; PERFORMANCE.md "Capacity")."""
    index: dict[int, list[tuple[str, float]]] = {}
    for tag, vec in vectors.items():
        for h, w in vec.items():
            index.setdefault(h, []).append((tag, w))
    return {h: tuple(entries) for h, entries in index.items()}


def trigram_similarities(text: str, index: dict[int, tuple[tuple[str, float], ...]]) -> dict[str, float]:
    """The cosine of ``text``'s trigram vector to each tag vector of ``index`` that shares a
    trigram with it (the others are 0 and left out): the same values as :func:`_cosine`."""
    return _index_similarities(_tokens(text)[2], index)


def _index_similarities(words: list[str], index: dict[int, tuple[tuple[str, float], ...]]) -> dict[str, float]:
    """:func:`trigram_similarities` of the text whose stripped lower-case words are ``words``.

    Bit for bit the sums the text's :func:`trigram_vector` would give, without building it:
    the trigram counts (a Counter keeps first-seen order, the vector's order), the norm from
    the sum of their squares in integers (the vector's float sum of the same integers is exact
    too below 2**53, i.e. for any text under ~10**8 trigrams), then each shared trigram's
    ``count / norm * weight`` added per tag in that same order."""
    counts = Counter(chain.from_iterable(map(_word_trigrams, words)))
    if not counts:
        return {}
    values = counts.values()
    norm = math.sqrt(sum(map(mul, values, values)))
    sims: dict[str, float] = {}
    get = index.get
    for h, n in counts.items():
        entries = get(h)
        if entries:
            v = n / norm
            for tag, w in entries:
                sims[tag] = sims.get(tag, 0.0) + v * w
    return sims


_WordInfo = tuple[tuple[int, ...], tuple[tuple[str, float], ...]]


def _word_info(index: dict[int, tuple[tuple[str, float], ...]]) -> Callable[[str], _WordInfo]:
    """word → (its hashed trigrams, and (tag, the sum of the tag's weights over those trigrams)
    for each tag of ``index`` sharing one), cached per index (bounded: clients choose words)."""

    def compute(word: str) -> _WordInfo:
        trigrams = _word_trigrams(word)
        sums: dict[str, float] = {}
        for h in trigrams:
            for tag, w in index.get(h, ()):
                sums[tag] = sums.get(tag, 0.0) + w
        return trigrams, tuple(sums.items())

    cached = functools.lru_cache(maxsize=1 << 14)(compute)

    def info(word: str) -> _WordInfo:
        return compute(word) if len(word) > CACHED_WORD_MAX else cached(word)

    info.cache_info = cached.cache_info  # type: ignore[attr-defined]
    return info


_first = itemgetter(0)


def _approximate_similarities(words: list[str], info: Callable[[str], _WordInfo], floor: float) -> tuple[dict[str, float], float]:
    """:func:`_index_similarities` of ``words`` summed in another order, for the tags that can
    reach ``floor``, and a bound on how far each value can be from that function's (so
    :func:`_analyse` can tell when the difference matters).

    The cosine to a tag is Σ_trigrams count·weight / norm = Σ_words partial(word) / norm, so
    a call adds a few cached per-word sums instead of a product per shared trigram and tag;
    the norm still needs the text's combined trigram counts. Each order adds at most T
    positive terms (T = the text's trigrams; weights and counts are positive), so each result
    is within about (T + 3)·2⁻⁵³ times the true cosine (at most 1) of it, and the two differ
    by less than the returned tolerance 1e-12 + T·1e-15 (over four times that). Tags below
    ``floor`` minus the tolerance are left out (:func:`_analyse` would ignore them)."""
    infos = list(map(info, words))
    counts = Counter(chain.from_iterable(map(_first, infos)))
    if not counts:
        return {}, 0.0
    values = counts.values()
    norm = math.sqrt(sum(map(mul, values, values)))
    tolerance = 1e-12 + sum(values) * 1e-15
    sums: dict[str, float] = {}
    for _, partials in infos:
        for tag, w in partials:
            sums[tag] = sums.get(tag, 0.0) + w
    lowest = floor - tolerance
    return {tag: sim for tag, a in sums.items() if (sim := a / norm) >= lowest}, tolerance


def _unsure(sim: float, floor: float, weight: float, tolerance: float) -> bool:
    """Whether moving ``sim`` by up to ``tolerance`` could change what :func:`_analyse` makes of
    it: the ``sim >= floor`` test, the sign of ``weight·sim``, or its rounding to 4 decimals
    (a boundary k·10⁻⁴ ± ½·10⁻⁴ within reach). Generous margins: a false alarm costs only the
    exact sums."""
    if sim < floor + tolerance:
        return True
    x = abs(weight * sim) * 1e4
    reach = (abs(weight) * tolerance * max(1.0, abs(sim)) + 1e-15 * abs(weight * sim)) * 2e4 + 1e-9
    return x <= reach or abs(x % 1.0 - 0.5) <= reach


def _cosine(a: dict[int, float], b: dict[int, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(k, 0.0) for k, v in a.items())
