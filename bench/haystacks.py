"""Needle-in-a-haystack items on varied text (no haystack is built by repeating a unit), seeded, offline.

Haystacks:

* ``prose`` -- natural legal prose: Debian's ``/usr/share/common-licenses/*`` (GPL, LGPL, Apache, MPL, GFDL,
  ...), sentence by sentence with repeated sentences dropped, continued by the docstrings of the Python
  standard library (read with ``ast``, nothing imported) where a context needs more text or the licenses are
  missing. Each item starts at its own seeded place in that text.
* ``sentences`` -- generated varied sentences: a small grammar (many subjects, verbs, objects, places, times
  and sentence shapes), every sentence of a context different.
* ``code`` -- real Python standard-library source, whole lines, from a seeded module on.

Needles (inserted at a sentence or line boundary; in code as a comment line):

* ``number`` -- "The special magic number is 48213."
* ``word`` -- "The secret password is pelican."
* ``fact`` -- "Marta Kowalski moved to Lisbon last spring.", asked back as a question: "Which city did Marta
  Kowalski move to last spring?"

Needle names, cities and words come from pools the sentence grammar never uses. ``depth`` is measured with the
caller's tokenizer: the share of the context's tokens before the needle. ``build_chat_items`` makes the
multi-turn chat case: a fact given in an early user turn, many turns of other conversation, then the question.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CountTokens = Callable[[str], int]

HAYSTACKS = ("prose", "sentences", "code")
NEEDLE_KINDS = ("number", "word", "fact")
DEPTHS = (0.05, 0.15, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85, 0.95)   # three per depth band (0-33, 33-66, 66-100%)
QUICK_DEPTHS = (0.5,)
MIN_DEPTH, MAX_DEPTH = 0.05, 0.95
BANDS = ((0.0, 1 / 3, "0-33%"), (1 / 3, 2 / 3, "33-66%"), (2 / 3, 1.0001, "66-100%"))
LICENSES = Path("/usr/share/common-licenses")

# ------------------------------------------------------------------ items


def normalise(text: str) -> str:
    """Lower case, every run of non-alphanumerics one space."""
    return " " + re.sub(r"[^0-9a-z]+", " ", text.lower()).strip() + " "


@dataclass(frozen=True)
class RetrievalItem:
    item_id: str        # stable and unique, e.g. "prose-number-2048-d0.40"
    haystack: str       # "prose" | "sentences" | "code"
    needle_kind: str    # "number" | "word" | "fact"
    depth: float        # share of the context's tokens before the needle (0.05 .. 0.95)
    length: int         # target context tokens
    context: str        # the haystack with the needle inside (what gets compressed)
    question: str       # appended after the context; plain completion, no chat template
    answer: str         # expected answer
    needle: str = ""    # the needle sentence as inserted

    def prompt(self) -> str:
        return self.context + self.question

    def correct(self, output: str) -> bool:
        """The answer, as a whole word, in the generated text (normalised: case and punctuation ignored)."""
        return normalise(self.answer) in normalise(output)


@dataclass(frozen=True)
class ChatItem:
    """A conversation for ``create_chat_completion``: the fact in an early user turn, the question last."""

    item_id: str
    needle_kind: str
    depth: float                             # share of the conversation's tokens before the fact's turn
    length: int                              # target conversation tokens
    turns: tuple[tuple[str, str], ...]       # (role, content), the question last
    answer: str
    haystack: str = "chat"

    def messages(self) -> list[dict[str, Any]]:
        return [{"role": role, "content": content} for role, content in self.turns]

    def correct(self, output: str) -> bool:
        return normalise(self.answer) in normalise(output)


def band(depth: float) -> str:
    """The depth band ("0-33%", "33-66%", "66-100%") a depth falls in."""
    return next(name for lo, hi, name in BANDS if lo <= depth < hi)


def item_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


# ------------------------------------------------------------------ needles

NEEDLE_WORDS = ("pelican", "tangerine", "zeppelin", "saffron", "walrus", "origami", "kayak", "cactus",
                "igloo", "banjo", "pretzel", "hammock", "lobster", "tornado", "jasmine", "avocado",
                "flamingo", "marzipan", "trombone", "porcupine", "quokka", "nutmeg", "toboggan", "mongoose")
FIRST_NAMES = ("Marta", "Tomasz", "Ingrid", "Rafael", "Yuki", "Anselm", "Noor", "Bartholomew", "Ilse",
               "Dmitri", "Priya", "Osvaldo", "Greta", "Kwame", "Soledad", "Lorcan", "Henrike", "Emeka")
LAST_NAMES = ("Kowalski", "Lindqvist", "Okonkwo", "Castellanos", "Fujimoto", "Brennan", "Haddad",
              "Vasquez", "Novak", "Abernathy", "Szabo", "Oyelaran", "Quintero", "Mbeki", "Halvorsen")
# well-known, plainly spelled cities (SmolLM2-135M misspells or replaces rarer names even with the full cache),
# none of the few a small model guesses by default (Paris, London, Berlin, Tokyo, New York)
CITIES = ("Lisbon", "Oslo", "Dublin", "Vienna", "Prague", "Madrid", "Cairo", "Lima", "Quito", "Denver",
          "Helsinki", "Budapest", "Warsaw", "Athens", "Nairobi", "Havana", "Seoul", "Toronto")

QUESTION_NUMBER = "What is the special magic number mentioned in the text?"


@dataclass(frozen=True)
class Needle:
    kind: str
    sentence: str    # what goes into the haystack
    question: str    # appended after the context
    answer: str


def make_needle(kind: str, rng: random.Random) -> Needle:
    if kind == "number":
        n = str(rng.randint(10000, 99999))
        return Needle(kind, f"The special magic number is {n}.",
                      f"\n\nQuestion: {QUESTION_NUMBER}\nAnswer: The special magic number is", n)
    if kind == "word":
        w = rng.choice(NEEDLE_WORDS)
        return Needle(kind, f"The secret password is {w}.",
                      "\n\nQuestion: What is the secret password mentioned in the text?\n"
                      "Answer: The secret password is", w)
    if kind == "fact":
        name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        city = rng.choice(CITIES)
        # asked as a question about the move: "where does X live now" (an inference) left SmolLM2-135M's full
        # cache at 5 of 9 items, and the answer prefix "X now lives in" often made it start a new line
        return Needle(kind, f"{name} moved to {city} last spring.",
                      f"\n\nQuestion: Which city did {name} move to last spring?\nAnswer: {name} moved to", city)
    raise ValueError(f"unknown needle kind {kind!r} (known: {', '.join(NEEDLE_KINDS)})")


# ------------------------------------------------------------------ haystack sources


def split_sentences(paragraph: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;:])\s+(?=[A-Z(\"'])", paragraph) if s]


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with their hard line wraps joined."""
    return [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _prose_like(paragraph: str) -> bool:
    letters = sum(c.isalpha() or c == " " for c in paragraph)
    return (len(paragraph) >= 60 and letters / len(paragraph) > 0.9 and ">>>" not in paragraph
            and paragraph[-1] in ".:;")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return [d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d]


@lru_cache(maxsize=1)
def prose_paragraphs() -> tuple[tuple[str, ...], ...]:
    """The natural-prose source as paragraphs of sentences, every sentence once: the licenses Debian ships,
    then standard-library docstrings."""
    texts: list[str] = []
    if LICENSES.is_dir():
        for f in sorted(LICENSES.iterdir()):
            if f.is_file() and not f.is_symlink():
                texts.append(f.read_text(encoding="utf-8", errors="replace"))
    for f in sorted(stdlib_dir().glob("*.py")):
        texts += _docstrings(f)
    seen: set[str] = set()
    out: list[tuple[str, ...]] = []
    for text in texts:
        for para in _paragraphs(text):
            if not _prose_like(para):
                continue
            fresh = []
            for s in split_sentences(para):
                key = normalise(s)
                if key not in seen and len(key) > 12:
                    seen.add(key)
                    fresh.append(s)
            if fresh:
                out.append(tuple(fresh))
    return tuple(out)


CODE_MODULES = ("argparse.py", "textwrap.py", "csv.py", "heapq.py", "bisect.py", "functools.py",
                "fractions.py", "statistics.py", "string.py", "shlex.py", "calendar.py", "difflib.py",
                "ipaddress.py", "configparser.py", "pprint.py", "dataclasses.py", "enum.py", "tokenize.py",
                "ftplib.py", "smtplib.py", "zipfile.py", "tarfile.py", "inspect.py", "typing.py")


@lru_cache(maxsize=1)
def code_lines() -> tuple[str, ...]:
    """Standard-library source lines, module after module (a ``# file:`` line before each)."""
    lines: list[str] = []
    for name in CODE_MODULES:
        path = stdlib_dir() / name
        if path.is_file():
            lines.append(f"# file: {name}")
            lines += [ln.rstrip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return tuple(lines)


# the grammar of the generated sentences (no needle name, city or word appears in it)
SUBJECTS = ("the baker", "a young engineer", "my neighbour", "the old fisherman", "the mayor", "a tired nurse",
            "the librarian", "our teacher", "a street musician", "the gardener", "the night guard",
            "a retired pilot", "the shopkeeper", "my cousin", "the carpenter", "a quiet student", "the doctor",
            "the painter", "a local farmer", "the postman", "the chef", "an elderly couple", "the tailor",
            "a group of hikers", "the bus driver", "the museum curator", "a curious child", "the landlord")
VERBS = (("repaired", "repair"), ("painted", "paint"), ("sold", "sell"), ("found", "find"), ("borrowed", "borrow"),
         ("carried", "carry"), ("cleaned", "clean"), ("described", "describe"), ("photographed", "photograph"),
         ("ordered", "order"), ("measured", "measure"), ("returned", "return"), ("hid", "hide"),
         ("wrapped", "wrap"), ("inspected", "inspect"), ("polished", "polish"), ("counted", "count"),
         ("replaced", "replace"), ("delivered", "deliver"), ("forgot", "forget"))
ADJECTIVES = ("old", "heavy", "broken", "green", "wooden", "tiny", "rusty", "expensive", "borrowed", "dusty",
              "striped", "folded", "noisy", "fragile", "yellow", "square", "ancient", "shiny", "torn", "warm")
OBJECTS = ("bicycle", "ladder", "umbrella", "teapot", "map", "suitcase", "clock", "blanket", "kettle", "lamp",
           "notebook", "wheelbarrow", "guitar", "mirror", "basket", "chair", "telescope", "radio", "coat",
           "fence", "boat", "bench", "drawer", "carpet", "window frame", "tool box", "picture", "jar of honey")
PLACES = ("in the market square", "behind the station", "near the river", "at the bakery", "in the attic",
          "by the harbour", "in the town hall", "under the bridge", "at the school gate", "in the garden",
          "on the hill", "in the library", "at the corner shop", "in the parking lot", "beside the church",
          "in the old mill", "at the post office", "on the ferry", "in the kitchen", "near the football field")
TIMES = ("on Monday morning", "late last night", "before breakfast", "after the storm", "during the festival",
         "at noon", "in early autumn", "on a rainy Tuesday", "just before sunset", "the day after the wedding",
         "while it was snowing", "last weekend", "at dawn", "during the long holiday", "after lunch")
REASONS = ("because the roof was leaking", "for the village fair", "to surprise a friend", "without asking anyone",
           "as a favour to the neighbours", "for reasons nobody understood", "before the guests arrived",
           "to win a small bet", "as the weather turned cold", "while humming an old song")


DETERMINERS = ("the", "a", "a friend's", "their", "her", "his")


def _sentence(rng: random.Random) -> str:
    s, (past, base) = rng.choice(SUBJECTS), rng.choice(VERBS)
    obj = f"{rng.choice(DETERMINERS)} {rng.choice(ADJECTIVES)} {rng.choice(OBJECTS)}"
    obj = re.sub(r"^a (?=[aeiou])", "an ", obj)
    place, time, reason = rng.choice(PLACES), rng.choice(TIMES), rng.choice(REASONS)
    shape = rng.randrange(6)
    if shape == 0:
        text = f"{s} {past} {obj} {place} {time}."
    elif shape == 1:
        text = f"{time}, {s} {past} {obj} {reason}."
    elif shape == 2:
        text = f"{place.capitalize()}, {s} {past} {obj} {time}."
    elif shape == 3:
        text = f"nobody expected {s} to {base} {obj} {place}."
    elif shape == 4:
        text = f"{s} said that {rng.choice(SUBJECTS)} had {past} {obj} {reason}."
    else:
        text = f"{s} wanted to {base} {obj} {place}, but it was too late {time}."
    return text[0].upper() + text[1:]


def generated_sentences(n: int, rng: random.Random) -> list[str]:
    """n different sentences of the grammar."""
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        s = _sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ------------------------------------------------------------------ assembly


def haystack_pieces(haystack: str, rng: random.Random, n_chars: int) -> list[str]:
    """Consecutive pieces of a haystack (each a sentence or a line with its separator), at least n_chars long;
    a needle may go before any piece."""
    pieces: list[str] = []
    total = 0
    if haystack == "prose":
        paras = prose_paragraphs()
        i = rng.randrange(len(paras))
        taken = 0
        while total < n_chars:
            if taken >= len(paras):
                raise ValueError(f"the prose source has fewer than {n_chars} characters")
            sents = paras[i % len(paras)]
            for j, s in enumerate(sents):
                pieces.append(s + ("\n\n" if j == len(sents) - 1 else " "))
                total += len(pieces[-1])
            i, taken = i + 1, taken + 1
    elif haystack == "sentences":
        while total < n_chars:
            para = generated_sentences(rng.randint(4, 7), rng)
            for j, s in enumerate(para):
                pieces.append(s + ("\n\n" if j == len(para) - 1 else " "))
                total += len(pieces[-1])
        # sentences of different paragraphs may coincide: keep the first of each
        seen: set[str] = set()
        unique = []
        for p in pieces:
            if p.strip() not in seen:
                seen.add(p.strip())
                unique.append(p)
        pieces = unique
    elif haystack == "code":
        lines = code_lines()
        i = rng.randrange(len(lines))
        while lines[i % len(lines)].startswith((" ", "\t")) or not lines[i % len(lines)]:
            i += 1   # start at a top-level line
        start = i
        while total < n_chars:
            if i - start >= len(lines):
                raise ValueError(f"the code source has fewer than {n_chars} characters")
            pieces.append(lines[i % len(lines)] + "\n")
            total += len(pieces[-1])
            i += 1
    else:
        raise ValueError(f"unknown haystack {haystack!r} (known: {', '.join(HAYSTACKS)})")
    return pieces


def needle_piece(haystack: str, needle: Needle, following: str) -> str:
    """The needle as a piece before `following`: its own sentence, or in code a comment line at the
    following line's indentation."""
    if haystack == "code":
        indent = following[:len(following) - len(following.lstrip(" \t"))] if following.strip() else ""
        return f"{indent}# {needle.sentence}\n"
    return needle.sentence + " "


def fit_pieces(haystack: str, rng: random.Random, length: int, count_tokens: CountTokens) -> list[str]:
    """Pieces whose text is about `length` tokens (a little under, never over by more than a piece)."""
    state = rng.getstate()
    n_chars = int(length * 5.5) + 400   # English and code: 2.5-4.5 characters a token
    while count_tokens("".join(pieces := haystack_pieces(haystack, rng, n_chars))) < length:
        rng.setstate(state)             # the same text, longer
        n_chars *= 2
    # the shortest prefix of at least `length` tokens (binary search)
    lo, hi = 1, len(pieces)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens("".join(pieces[:mid])) < length:
            lo = mid + 1
        else:
            hi = mid
    return pieces[:lo]


def insert_needle(haystack: str, pieces: list[str], needle: Needle, depth: float,
                  count_tokens: CountTokens) -> tuple[str, float]:
    """The context with the needle before the piece boundary whose token share is closest to depth, and
    the measured depth (tokens before the needle / tokens of the context)."""
    total = count_tokens("".join(pieces))
    target = depth * total
    lo, hi = 0, len(pieces)
    while lo < hi:     # first boundary with at least `target` tokens before it
        mid = (lo + hi) // 2
        if count_tokens("".join(pieces[:mid])) < target:
            lo = mid + 1
        else:
            hi = mid
    share = {b: count_tokens("".join(pieces[:b])) / total for b in (lo - 1, lo) if 0 <= b <= len(pieces)}
    best = min(share, key=lambda b: abs(share[b] - depth))
    if not MIN_DEPTH <= share[best] <= MAX_DEPTH and len(share) == 2:
        best = lo if share[best] < MIN_DEPTH else lo - 1   # the other side of the target stays inside 5-95%
    if haystack == "code" and best > 0 and best < len(pieces) and pieces[best - 1].rstrip().endswith(("\\", ",", "(")):
        best = min(len(pieces), best + 1)   # not inside a continued line (a comment there is still valid)
    following = pieces[best] if best < len(pieces) else ""
    before = "".join(pieces[:best])
    context = before + needle_piece(haystack, needle, following) + "".join(pieces[best:])
    return context, count_tokens(before) / count_tokens(context)


def make_item(haystack: str, needle_kind: str, depth: float, length: int, count_tokens: CountTokens) -> RetrievalItem:
    item_id = f"{haystack}-{needle_kind}-{length}-d{depth:.2f}"
    rng = random.Random(item_seed(item_id))
    needle = make_needle(needle_kind, rng)
    pieces = fit_pieces(haystack, rng, length, count_tokens)
    context, measured = insert_needle(haystack, pieces, needle, depth, count_tokens)
    return RetrievalItem(item_id, haystack, needle_kind, round(measured, 3), length, context, needle.question,
                         needle.answer, needle.sentence)


def build_items(count_tokens: CountTokens, lengths: Sequence[int], quick: bool = False, *,
                depths: Sequence[float] | None = None, every_length: bool = False,
                haystacks: Sequence[str] = HAYSTACKS,
                needle_kinds: Sequence[str] = NEEDLE_KINDS) -> list[RetrievalItem]:
    """Items for every (haystack, needle kind, depth). Each combination gets one of `lengths` in rotation
    (so every length meets every kind and depth band), or every length with ``every_length``. ``quick``: one
    item per haystack at depth 0.5, needle kinds in turn, at the first length."""
    if quick:
        return [make_item(h, needle_kinds[i % len(needle_kinds)], QUICK_DEPTHS[0], lengths[0], count_tokens)
                for i, h in enumerate(haystacks)]
    depths = tuple(DEPTHS if depths is None else depths)
    items: list[RetrievalItem] = []
    k = 0
    for h in haystacks:
        for n in needle_kinds:
            for d in depths:
                chosen = list(lengths) if every_length else [lengths[k % len(lengths)]]
                items += [make_item(h, n, d, L, count_tokens) for L in chosen]
                k += 1
    return items


# ------------------------------------------------------------------ multi-turn chat

CHAT_FACTS = {
    "fact": ("By the way, my sister {name} moved to {city} last spring.",
             "Earlier I told you about my sister {name}. In which city does she live now? Answer with the city only.",
             "{city}"),
    "number": ("Please remember that my locker number at the gym is {number}.",
               "What is my locker number at the gym? Answer with the number only.", "{number}"),
    "word": ("My dog is called {word}, after a childhood joke.",
             "What is my dog called? Answer with the name only.", "{word}"),
}
CHAT_DEPTHS = (0.05, 0.15, 0.3)     # early turns


def _chat_turn(rng: random.Random) -> tuple[str, str]:
    """A user question and an assistant answer of other conversation, made of generated sentences."""
    topic = rng.choice(OBJECTS)
    place = rng.choice(PLACES)
    question = rng.choice((f"Can you tell me a short story about a {topic}?",
                           f"What happened {place} yesterday?",
                           f"Write a few sentences about a {rng.choice(ADJECTIVES)} {topic}.",
                           f"Describe a day {place}.",
                           f"Give me an example of something that happened {rng.choice(TIMES)}."))
    answer = " ".join(generated_sentences(rng.randint(3, 6), rng))
    return question, answer


def make_chat_item(needle_kind: str, depth: float, length: int, count_tokens: CountTokens) -> ChatItem:
    item_id = f"chat-{needle_kind}-{length}-d{depth:.2f}"
    rng = random.Random(item_seed(item_id))
    values = {"name": rng.choice(FIRST_NAMES), "city": rng.choice(CITIES), "number": str(rng.randint(100, 999)),
              "word": rng.choice(NEEDLE_WORDS).capitalize()}
    fact_t, question_t, answer_t = CHAT_FACTS[needle_kind]
    fact = fact_t.format(**values)
    question = question_t.format(**values)

    def text_of(turns: list[tuple[str, str]]) -> str:
        return "\n".join(c for _, c in turns)

    other: list[tuple[str, str]] = []
    seen: set[str] = set()
    while count_tokens(text_of(other)) < length:
        q, a = _chat_turn(rng)
        if q in seen:
            continue
        seen.add(q)
        other += [("user", q), ("assistant", a)]
    # the fact goes into the user turn whose start is closest to `depth` of the conversation
    starts = [count_tokens(text_of(other[:i])) for i in range(0, len(other), 2)]
    total = count_tokens(text_of(other))
    turn = min(range(len(starts)), key=lambda i: abs(starts[i] - depth * total))
    idx = 2 * turn
    role, content = other[idx]
    other[idx] = (role, fact + " " + content)
    turns = tuple(other + [("user", question)])
    measured = count_tokens(text_of(list(turns[:idx]))) / count_tokens(text_of(list(turns)))
    return ChatItem(item_id, needle_kind, round(measured, 3), length, turns, answer_t.format(**values))


def build_chat_items(count_tokens: CountTokens, lengths: Sequence[int], quick: bool = False,
                     depths: Sequence[float] = CHAT_DEPTHS) -> list[ChatItem]:
    """Chat items for every (needle kind, early depth), lengths in rotation; ``quick``: one item."""
    if quick:
        return [make_chat_item("fact", depths[0], lengths[0], count_tokens)]
    items: list[ChatItem] = []
    k = 0
    for n in CHAT_FACTS:
        for d in depths:
            items.append(make_chat_item(n, d, lengths[k % len(lengths)], count_tokens))
            k += 1
    return items
