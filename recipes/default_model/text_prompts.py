"""Plain text questions (no image) for distillation: the default model's language stage also trains on the base
SmolLM2's own answers to these, so the LoRA learns the image questions without changing how text questions are
answered. Templated, deterministic, and disjoint from the held-out questions of `probes/text_answers.py`.
"""

from __future__ import annotations

import itertools

import numpy as np

_COUNTRIES = ("Germany", "Italy", "Spain", "Japan", "Canada", "Egypt", "Kenya", "Peru", "Norway", "India",
              "Mexico", "Chile", "Greece", "Turkey", "Poland", "Vietnam", "Argentina", "Australia")
_WORDS = ("big", "fast", "bright", "quiet", "brave", "smart", "old", "strong", "kind", "angry", "easy", "rich")
_TOPICS = ("the moon", "rain", "a cat", "the forest", "coffee", "winter", "a river", "friendship", "music",
           "the city at night", "mountains", "a garden", "the wind", "books")
_CONCEPTS = ("gravity", "electricity", "a volcano", "democracy", "the internet", "evaporation", "a black hole",
             "inflation", "vaccines", "a rainbow", "DNA", "an atom", "recycling", "a computer program")
_ANIMALS = ("elephants", "dolphins", "owls", "penguins", "tigers", "frogs", "horses", "octopuses", "ants",
            "wolves", "camels", "bats")
_ELEMENTS = ("silver", "iron", "oxygen", "sodium", "carbon", "helium", "copper", "lead")
_PHRASES = ("thank you", "good night", "how are you", "I love books", "see you tomorrow", "where is the station")
_LANGUAGES = ("Spanish", "German", "Italian")
_BOOKS = ("Hamlet", "Pride and Prejudice", "1984", "The Odyssey", "Don Quixote", "War and Peace")
_CATEGORIES = ("fruits", "vegetables", "musical instruments", "planets", "sports", "birds", "metals",
               "programming languages", "European rivers", "board games")


def _arithmetic() -> list[str]:
    rng = np.random.default_rng(7)
    out = []
    for _ in range(24):
        a, b = (int(x) for x in rng.integers(2, 60, 2))
        op = ("plus", "minus", "times")[int(rng.integers(3))]
        if (a, op, b) != (12, "times", 7):
            out.append(f"What is {a} {op} {b}?")
    return out


def general_questions() -> list[str]:
    """About 220 short general questions, in a fixed shuffled order (any prefix mixes the kinds)."""
    qs = [f"What is the capital of {c}?" for c in _COUNTRIES]
    qs += [f"Give me a synonym for {w}." for w in _WORDS] + [f"What is the opposite of {w}?" for w in _WORDS]
    qs += [f"Write a short sentence about {t}." for t in _TOPICS] + [f"Write a haiku about {t}." for t in _TOPICS]
    qs += [f"Explain {c} in simple terms." for c in _CONCEPTS] + [f"What is {c}?" for c in _CONCEPTS]
    qs += [f"What do {a} eat?" for a in _ANIMALS] + [f"Tell me a fun fact about {a}." for a in _ANIMALS]
    qs += [f"What is the chemical symbol for {e}?" for e in _ELEMENTS]
    qs += [f"Translate '{p}' into {lang}." for p, lang in itertools.product(_PHRASES, _LANGUAGES)]
    qs += [f"Who wrote {b}?" for b in _BOOKS] + [f"Name three {c}." for c in _CATEGORIES]
    qs += [f"Name {c} that starts with the letter {ch}." for c, ch in
           itertools.product(("a fruit", "an animal", "a country"), "BCMPST")]
    qs += _arithmetic()
    qs += ["How are you today?", "Tell me a joke.", "What is your name?", "Give me a tip for sleeping better.",
           "How do I boil an egg?", "What is a good name for a dog?", "Why is the sky blue?",
           "How many hours are in a week?", "What is the freezing point of water in Fahrenheit?",
           "Suggest a healthy breakfast.", "What is the tallest mountain in the world?",
           "How many continents are there?", "What is the longest river in Africa?", "Who was Albert Einstein?",
           "What is the speed of light?", "What is a prime number?", "How do plants drink water?"]
    order = np.random.default_rng(0).permutation(len(qs))
    return [qs[i] for i in order]


__all__ = ["general_questions"]
