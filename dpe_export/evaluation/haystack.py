"""Filler text ("haystack") for long-context retrieval prompts.

Two sources:

* :func:`generate_haystack` composes varied, natural-looking English prose from sentence templates and
  word lists written for this project (no third-party corpus, so no licensing questions). It is fully
  deterministic: the same ``seed`` always gives the same text. The text contains no digits, so numeric
  needles (pass keys, magic numbers) are the only numbers in a prompt.
* :func:`load_haystack` reads a user-supplied text file (``--haystack FILE``) and repeats it, with a
  warning, when it is shorter than requested.

:func:`iter_sentences` is the underlying infinite sentence stream; :mod:`dpe_export.tasks` consumes
sentences one by one so that it can cut filler at sentence boundaries.
"""
from __future__ import annotations

import itertools
import random
import re
import warnings
from pathlib import Path
from typing import Iterator, Optional, Union

_PEOPLE = [
    "the old fisherman", "a young teacher", "the baker", "my neighbour", "the mayor", "a tired traveller",
    "the librarian", "her grandmother", "the shepherd", "a quiet student", "the gardener", "the captain",
    "his younger brother", "the village doctor", "a street musician", "the carpenter", "our guide",
    "the painter", "a retired sailor", "the shopkeeper", "the night watchman", "a curious child",
    "the farmer's daughter", "the postman", "an elderly couple", "the young engineer", "the cook",
    "a group of hikers", "the schoolmaster", "the innkeeper", "my cousin", "the weaver", "the potter",
    "a local historian", "the blacksmith", "the miller", "two old friends", "the ferryman",
]


_NAMES = [
    "Anna", "Thomas", "Maria", "Oliver", "Clara", "Samuel", "Lucy", "Daniel", "Helen", "Victor", "Rosa",
    "Peter", "Elena", "Martin", "Julia", "Hugo", "Nora", "Felix", "Irene", "Leo", "Margaret", "Simon",
    "Greta", "Arthur", "Sofia", "Jonas", "Alice", "Edward", "Mila", "Oscar",
]


_ANIMALS = [
    "the grey cat", "a flock of geese", "the old dog", "a small fox", "the brown horse", "a pair of swans",
    "the goats", "a heron", "the sheep", "a family of ducks", "the young colt", "an owl", "the bees",
    "a red squirrel", "the cows", "a crow",
]


_THINGS = [
    "the grass", "the sky", "the sea", "the river", "the forest", "the old bridge", "the harbour",
    "the wind", "the rain", "the morning light", "the valley", "the mountain path", "the garden",
    "the orchard", "the market square", "the lighthouse", "the wheat field", "the little chapel",
    "the stone wall", "the lake", "the meadow", "the evening air", "the snow", "the fog",
]


_PLACES = [
    "in the village", "by the river", "near the harbour", "at the edge of the forest", "in the market",
    "on the hill", "behind the church", "along the coast", "in the kitchen", "at the train station",
    "under the old oak", "in the library", "on the bridge", "across the valley", "in the small bakery",
    "near the mill", "by the fountain", "in the garden", "on the main road", "at the top of the tower",
    "beside the lake", "in the workshop", "at the crossroads", "in the courtyard", "down by the docks",
    "in the meadow", "outside the town hall", "on the narrow street", "inside the greenhouse",
]


_TIMES = [
    "in the morning", "every evening", "at dawn", "late at night", "on Sundays", "after lunch",
    "in early spring", "during the long winter", "at the end of summer", "before sunrise", "in autumn",
    "once a week", "every other day", "at noon", "on rainy afternoons", "after the harvest",
    "when the days grew shorter", "in those years", "just before dinner", "on market days", "at dusk",
]


_VERBS_T = [  # transitive, past tense
    "carried", "painted", "repaired", "found", "sold", "bought", "cleaned", "opened", "closed", "watched",
    "cooked", "planted", "gathered", "mended", "wrapped", "counted", "polished", "collected", "borrowed",
    "lent", "delivered", "described", "remembered", "noticed", "admired", "built", "sketched", "studied",
]


_VERBS_I = [  # intransitive, past tense
    "walked", "waited", "laughed", "slept", "sang", "worked", "rested", "wandered", "listened", "hurried",
    "paused", "smiled", "whistled", "read quietly", "talked for hours", "stayed late", "travelled",
]


_VERBS_PRESENT = [
    "walks", "waits", "works", "rests", "wanders", "reads", "sings", "listens", "cooks", "paints",
    "writes letters", "tends the garden", "feeds the birds", "mends the nets", "sweeps the floor",
]


_OBJECTS = [
    "a basket of apples", "the heavy wooden door", "a letter from the city", "an old map", "fresh bread",
    "a bundle of firewood", "the broken lantern", "a blue umbrella", "the fishing nets", "a jar of honey",
    "a small wooden box", "the silver spoons", "a pile of books", "warm blankets", "a new coat",
    "the garden tools", "a bunch of flowers", "the old clock", "a sack of flour", "the painted chairs",
    "a pair of boots", "the kitchen table", "a cup of tea", "the morning newspaper", "a woollen scarf",
    "the church bell", "a copper kettle", "a bag of seeds", "the leather saddle", "a roll of canvas",
]


_ADJECTIVES = [
    "quiet", "bright", "cold", "warm", "calm", "busy", "peaceful", "grey", "green", "golden", "gentle",
    "pleasant", "damp", "clear", "still", "windy", "soft", "fresh", "crowded", "lonely", "cheerful",
    "narrow", "wide", "ancient", "familiar", "strange", "beautiful", "simple",
]


_FEELINGS = [
    "happy", "tired", "content", "surprised", "hopeful", "curious", "relieved", "proud", "restless",
    "thoughtful", "grateful", "amused", "calm", "worried",
]


_CONNECTIVES = [
    "Later,", "Meanwhile,", "After a while,", "Of course,", "Still,", "In the end,", "As usual,",
    "For a moment,", "Some time later,", "Even so,", "Then", "Afterwards,", "At first,", "Sometimes",
    "Every now and then,", "Without a word,", "By then,", "All the same,",
]


_SUBORDINATE = [
    "because the road was long", "while the kettle boiled", "although nobody was watching",
    "since the weather had turned", "before the light faded", "as the bells began to ring",
    "when the shops were closing", "after the rain had stopped", "until the fire burned low",
    "even though it was late", "as soon as the sun came out", "while the others were asleep",
    "because it seemed the right thing to do", "when the wind changed direction",
]


_NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "a dozen", "several", "a few", "many"]


_COUNTABLE = [
    "boats", "houses", "windows", "chairs", "trees", "lamps", "bridges", "letters", "songs", "stories",
    "paintings", "baskets", "candles", "fields", "roads", "visitors",
]


_SAYINGS = [
    "nothing good ever comes from hurrying", "a warm meal fixes most troubles",
    "the sea always gives back what it takes", "a tidy workshop makes a patient mind",
    "every road leads home in the end", "the best stories are told after dark",
    "an honest day of work is its own reward", "the river remembers everything",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _agent(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return rng.choice(_PEOPLE)
    if r < 0.8:
        return rng.choice(_NAMES)
    return rng.choice(_ANIMALS)


def _person(rng: random.Random) -> str:
    return rng.choice(_NAMES) if rng.random() < 0.5 else rng.choice(_PEOPLE)


def _t_simple(rng):
    return f"{_cap(_person(rng))} {rng.choice(_VERBS_T)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."


def _t_time_first(rng):
    return f"{_cap(rng.choice(_TIMES))}, {_agent(rng)} {rng.choice(_VERBS_I)} {rng.choice(_PLACES)}."


def _t_description(rng):
    a, b = rng.sample(_ADJECTIVES, 2)
    return f"{_cap(rng.choice(_THINGS))} was {a} and {b} {rng.choice(_TIMES)}."


def _t_short(rng):
    return f"{_cap(rng.choice(_THINGS))} was {rng.choice(_ADJECTIVES)}."


def _t_subordinate(rng):
    return (f"{_cap(_person(rng))} {rng.choice(_VERBS_T)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_SUBORDINATE)}.")


def _t_sub_first(rng):
    return f"{_cap(rng.choice(_SUBORDINATE))}, {_agent(rng)} {rng.choice(_VERBS_I)}."


def _t_connective(rng):
    c = rng.choice(_CONNECTIVES)
    return f"{c} {_agent(rng)} {rng.choice(_VERBS_I)} {rng.choice(_PLACES)}."


def _t_compound(rng):
    p1, p2 = _person(rng), _person(rng)
    conj = rng.choice(["and", "but", "while", "so"])
    return (f"{_cap(p1)} {rng.choice(_VERBS_T)} {rng.choice(_OBJECTS)}, {conj} {p2} "
            f"{rng.choice(_VERBS_I)} {rng.choice(_PLACES)}.")


def _t_feeling(rng):
    return (f"{_cap(_person(rng))} felt {rng.choice(_FEELINGS)} {rng.choice(_SUBORDINATE)}.")


def _t_habit(rng):
    return f"{_cap(_person(rng))} usually {rng.choice(_VERBS_PRESENT)} {rng.choice(_TIMES)}."


def _t_there_were(rng):
    return (f"There were {rng.choice(_NUMBER_WORDS)} {rng.choice(_COUNTABLE)} {rng.choice(_PLACES)}, "
            f"and most of them looked {rng.choice(_ADJECTIVES)}.")


def _t_speech(rng):
    verb = rng.choice(["said", "used to say", "once told us", "often remarked", "liked to repeat"])
    return f"{_cap(_person(rng))} {verb} that {rng.choice(_SAYINGS)}."


def _t_question(rng):
    return (f"Who could have guessed that {_person(rng)} would {rng.choice(['stay', 'return', 'wait', 'sing'])} "
            f"{rng.choice(_PLACES)} {rng.choice(_TIMES)}?")


def _t_list(rng):
    objs = rng.sample(_OBJECTS, 3)
    return f"On the table lay {objs[0]}, {objs[1]} and {objs[2]}."


def _t_long(rng):
    return (f"{_cap(rng.choice(_TIMES))}, {_person(rng)} {rng.choice(_VERBS_T)} {rng.choice(_OBJECTS)} "
            f"{rng.choice(_PLACES)}, {rng.choice(_SUBORDINATE)}, and {_agent(rng)} "
            f"{rng.choice(_VERBS_I)} nearby.")


def _t_weather(rng):
    return (f"The weather {rng.choice(['turned', 'stayed', 'grew', 'became'])} {rng.choice(_ADJECTIVES)} "
            f"{rng.choice(_TIMES)}, {rng.choice(['as it often did', 'which surprised no one', 'for once', 'as expected'])}.")


def _t_exclaim(rng):
    return f"What a {rng.choice(_ADJECTIVES)} {rng.choice(['day', 'evening', 'morning', 'week', 'season'])} it was!"


_TEMPLATES = [
    (_t_simple, 10), (_t_time_first, 8), (_t_description, 8), (_t_short, 4), (_t_subordinate, 7),
    (_t_sub_first, 5), (_t_connective, 8), (_t_compound, 6), (_t_feeling, 5), (_t_habit, 5),
    (_t_there_were, 4), (_t_speech, 3), (_t_question, 2), (_t_list, 3), (_t_long, 4), (_t_weather, 4),
    (_t_exclaim, 1),
]


_FUNCS = [f for f, _ in _TEMPLATES]


_WEIGHTS = [w for _, w in _TEMPLATES]


def iter_sentences(seed: int = 0) -> Iterator[str]:
    """An infinite, deterministic stream of generated English sentences (no digits)."""
    rng = random.Random(f"dpe-haystack-{seed}")
    while True:
        yield rng.choices(_FUNCS, weights=_WEIGHTS)[0](rng)


def _join_paragraphs(sentences: list[str], rng: random.Random) -> str:
    """Join sentences into paragraphs of 3-8 sentences separated by blank lines."""
    out, i = [], 0
    while i < len(sentences):
        n = rng.randint(3, 8)
        out.append(" ".join(sentences[i:i + n]))
        i += n
    return "\n\n".join(out)


def generate_haystack(num_words: Optional[int] = None, seed: int = 0, *, num_chars: Optional[int] = None,
                      paragraphs: bool = True) -> str:
    """Generate deterministic filler prose of at least ``num_words`` words (or ``num_chars`` characters).

    Exactly one of ``num_words`` / ``num_chars`` must be given. Whole sentences are produced, so the
    result slightly overshoots the request. With ``paragraphs`` the text is split into paragraphs by
    blank lines; otherwise sentences are joined by single spaces.
    """
    if (num_words is None) == (num_chars is None):
        raise ValueError("give exactly one of num_words or num_chars")
    target = num_words if num_words is not None else num_chars
    if target < 0:
        raise ValueError("the requested haystack size must be >= 0")
    sentences, size = [], 0
    for s in iter_sentences(seed):
        if size >= target:
            break
        sentences.append(s)
        size += len(s.split()) if num_words is not None else len(s) + 1
    if not paragraphs:
        return " ".join(sentences)
    return _join_paragraphs(sentences, random.Random(f"dpe-haystack-para-{seed}"))


_SENT_SPLIT = re.compile(r"(?<=[.!?…])[\"')\]]*\s+")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences (whitespace normalised; a sentence ends at ., ! or ? followed by space)."""
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return []
    return [s.strip() for s in _SENT_SPLIT.split(text) if s.strip()]


def load_haystack(path: Union[str, Path], num_chars: Optional[int] = None) -> str:
    """Read a user haystack file (UTF-8). With ``num_chars``, repeat it (with a warning) until it is at
    least that long."""
    text = Path(path).read_text(encoding="utf-8", errors="replace").strip()
    if not text:
        raise ValueError(f"haystack file {path} is empty")
    if num_chars is not None and len(text) < num_chars:
        reps = -(-num_chars // (len(text) + 2))
        warnings.warn(
            f"haystack file {path} has {len(text)} characters, fewer than the {num_chars} needed; "
            f"repeating it {reps} times", stacklevel=2)
        text = "\n\n".join([text] * reps)
    return text


def haystack_sentences(path: Optional[Union[str, Path]] = None, seed: int = 0) -> Iterator[str]:
    """Infinite sentence stream: generated (``path`` None) or from a user file, cycled when exhausted.

    Cycling a user file emits one warning the first time it wraps around.
    """
    if path is None:
        yield from iter_sentences(seed)
        return
    sents = split_sentences(load_haystack(path))
    if not sents:
        raise ValueError(f"haystack file {path} contains no text")
    # Start at a seed-dependent sentence so different seeds give different filler.
    start = random.Random(f"dpe-haystack-file-{seed}").randrange(len(sents))
    order = sents[start:] + sents[:start]
    yield from order
    warnings.warn(f"haystack file {path} is too short for this prompt ({len(sents)} sentences); "
                  "repeating it", stacklevel=2)
    yield from itertools.cycle(order)

