"""RULER-style synthetic long-context tasks (Hsieh et al., 2024), generated from a seed, no download.

Each task builds a prompt of about ``n_tokens`` tokens (measured with the model's tokenizer) and scores an
answer in [0, 1]:

* ``multikey`` -- several "special magic number" needles with different keys hidden in filler; the
  question asks for one key's number (RULER niah_multikey_1). Score 1 if the first number is right.
* ``vartrack`` -- a chain ``VAR A = 12345. VAR B = A. ...`` scattered in filler, plus a distractor chain;
  the question asks which variables hold the value (RULER vt). Score: share of the chain's names produced.
* ``cwe`` -- a numbered list of words where a few appear many times and the rest once (RULER cwe); the
  question asks for the most common words. Score: share of them produced.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from chelsea_gguf.passkey import FILLER

WORDS = ("apple river stone cloud tiger lemon piano garden rocket candle forest silver window marble "
         "engine desert harbor violet anchor meadow falcon copper island lantern pepper saddle tunnel "
         "walnut orchid pillow summit basket canyon ribbon thunder parrot glacier cobalt bamboo").split()


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    answers: tuple[str, ...]
    n_gen: int

    def score(self, output: str) -> float:
        if self.name == "multikey":
            m = re.search(r"\d+", output)
            return float(m is not None and m.group(0) == self.answers[0])
        found = {w for w in re.findall(r"[A-Za-z]+", output)}
        return sum(a in found for a in self.answers) / len(self.answers)


def _fill(units: list[str], n_filler: int, rng: random.Random) -> str:
    """n_filler filler sentences with the units inserted at random places, in order."""
    slots = sorted(rng.sample(range(n_filler + 1), len(units)))
    parts: list[str] = []
    last = 0
    for slot, unit in zip(slots, units):
        parts.append(FILLER * (slot - last))
        parts.append(unit)
        last = slot
    parts.append(FILLER * (n_filler - last))
    return "".join(parts)


def multikey(n_filler: int, rng: random.Random) -> Task:
    keys = rng.sample(WORDS, 4)
    values = [str(rng.randint(1_000_000, 9_999_999)) for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}. " for k, v in zip(keys, values)]
    rng.shuffle(needles)
    target = rng.randrange(len(keys))
    prompt = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n" + _fill(needles, n_filler, rng)
              + f"\nWhat is the special magic number for {keys[target]} mentioned in the provided text? "
              f"The special magic number for {keys[target]} mentioned in the provided text is")
    return Task("multikey", prompt, (values[target],), 12)


def vartrack(n_filler: int, rng: random.Random) -> Task:
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(8)]
    value, other = rng.randint(10000, 99999), rng.randint(10000, 99999)
    chain, decoy = names[:4], names[4:]
    units = [f"VAR {chain[0]} = {value}. "] + [f"VAR {chain[i]} = {chain[i - 1]}. " for i in range(1, 4)]
    decoys = [f"VAR {decoy[0]} = {other}. "] + [f"VAR {decoy[i]} = {decoy[i - 1]}. " for i in range(1, 4)]
    # keep each chain's order while interleaving the two
    merged: list[str] = []
    a, b = list(units), list(decoys)
    while a or b:
        merged.append((a if a and (not b or rng.random() < 0.5) else b).pop(0))
    prompt = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
              + _fill(merged, n_filler, rng)
              + f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
              f"Answer: According to the chain(s) of variable assignment in the text above, 4 variables are "
              f"assigned the value {value}, they are:")
    return Task("vartrack", prompt, tuple(chain), 30)


def cwe(n_words: int, rng: random.Random) -> Task:
    common = rng.sample(WORDS, 5)
    rare_pool = [w + s for w in WORDS if w not in common for s in ("", "s", "ed", "er")]
    n_common_each = max(3, n_words // 20)
    n_rare = max(1, n_words - n_common_each * len(common))
    words = common * n_common_each + [rng.choice(rare_pool) for _ in range(n_rare)]
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    prompt = ("Below is a numbered list of words. In these words, some appear more often than others. "
              "Memorize the ones that appear most often.\n" + listing
              + "\nQuestion: What are the 5 most common words in the above list? "
              "Answer: The top 5 words that appear most often in the list are:")
    return Task("cwe", prompt, tuple(common), 30)


GENERATORS: dict[str, Callable[[int, random.Random], Task]] = {"multikey": multikey, "vartrack": vartrack,
                                                               "cwe": cwe}


def fit_size(build: Callable[[int], str], n_tokens: int, count_tokens: Callable[[str], int]) -> int:
    """The size argument that makes build(size) about n_tokens tokens long (linear fit from two probes)."""
    a, b = 64, 256
    ta, tb = count_tokens(build(a)), count_tokens(build(b))
    per = (tb - ta) / (b - a)
    return max(8, round(a + (n_tokens - ta) / per)) if per > 0 else a


def make_task(name: str, n_tokens: int, seed: int, count_tokens: Callable[[str], int]) -> Task:
    """A task of about n_tokens tokens, generated from seed."""
    gen = GENERATORS[name]
    size = fit_size(lambda k: gen(k, random.Random(seed)).prompt, n_tokens, count_tokens)
    return gen(size, random.Random(seed))
