"""The passkey retrieval task (Mohtashami & Jaggi, 2023): a number hidden at some depth of filler text."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    prompt: str
    passkey: str
    depth: float

    def retrieved(self, answer: str) -> bool:
        """True if the first number in the answer is the passkey."""
        m = re.search(r"\d+", answer)
        return m is not None and m.group(0) == self.passkey


def passkey_prompt(n_filler: int, depth: float, seed: int) -> PasskeyPrompt:
    """n_filler repetitions of the filler (about 22 tokens each), the key line after a `depth` share of them."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    before = round(n_filler * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    text = INTRO + FILLER * before + needle + FILLER * (n_filler - before) + QUESTION
    return PasskeyPrompt(text, key, depth)
