"""Generated English sentences: the embed section's input (and ``benchmarks/policies.py``'s)."""

from __future__ import annotations

import random

_SUBJECTS = ["The committee", "A small dog", "My neighbour", "The new GPU", "Our database",
             "The morning train", "A quiet student", "The old lighthouse", "This recipe",
             "The weather service", "A busy restaurant", "The football team", "Her grandmother"]
_VERBS = ["announced", "chased", "repaired", "ignored", "predicted", "celebrated", "painted",
          "delayed", "translated", "measured", "forgot", "recommended", "questioned"]
_OBJECTS = ["the quarterly budget", "a red ball in the park", "the broken bicycle",
            "every warning about the storm", "a faster checkout process", "the winning goal",
            "an unusual sunset over the harbour", "the final chapter of the novel",
            "three kilograms of flour", "a long list of complaints", "the results of the survey"]
_TAILS = ["yesterday.", "before lunch.", "without telling anyone.", "for the third time.",
          "after a long discussion.", "despite the rain.", "in under an hour.", "again.",
          "with great enthusiasm.", "while everyone watched."]


def make_sentences(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n)]
