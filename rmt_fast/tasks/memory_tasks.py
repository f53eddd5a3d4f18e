"""Seeded synthetic versions of the RMT paper's memory tasks (arXiv 2304.11062, section 4), no downloads.

Three tasks, each a sequence of ``n_segments * segment_size`` content tokens that ends with a question:

* ``memorize``: one fact ("mary went to the kitchen .") at the very start, distractor text after it, and
  "where is mary ?" at the end.
* ``detect`` (Detect & Memorize): the same fact at a uniformly random token position. Placement rule:
  for ``n_segments >= 2`` the whole fact lies in segments ``0 .. n_segments - 2`` (never in the last segment,
  so the answer has to come through the memory); for ``n_segments == 1`` it lies anywhere before the question.
* ``reasoning``: two supporting facts ("mary picked up the apple .", "mary went to the garden .") plus one
  distractor fact about someone else going to a different place ("john went to the office ."), in random
  order at random positions, all before the last segment (same rule as ``detect``); the question is
  "where is the apple ?" -> garden. The distractor fact means that neither "the only place mentioned" nor any
  single fact answers the question: the object must be tied to its holder and the holder to a place.

The answer is a class over the places (``label = PLACES.index(place)``, chance ``1 / len(PLACES)``). The
question is always inside the last segment and the answer's place word never occurs there. Distractor text is
made of sentences drawn from a distractor vocabulary that shares no word with the facts' content (people,
places, objects, verbs) or with the question words.

Segments are counted the way the RMT wrappers cut them: the content fills exactly ``n_segments`` segments of
``segment_size`` tokens, so right- and left-aligned segmentations agree. Encoders: feed ``input_ids`` as they
are (the wrapper adds [CLS]/[MEM]/[SEP]). Decoders (``decoder=True``): the last token is the answer word, and
``labels`` is -100 everywhere but there, so a causal LM is trained/evaluated on predicting the answer after
the question (or classified from the logits at position -2 restricted to ``ANSWER_TOKEN_IDS``).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

TASKS = ("memorize", "detect", "reasoning")

PAD, CLS, SEP = "[PAD]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, CLS, SEP)

PEOPLE = ("mary", "john", "sandra", "daniel", "fred", "bill", "julie", "emily")
PLACES = ("kitchen", "bathroom", "bedroom", "garden", "hallway", "office", "cellar", "balcony")
OBJECTS = ("apple", "football", "milk", "box", "ball", "book", "key", "cup")
MOVE_VERBS = (("went", "to"), ("journeyed", "to"), ("travelled", "to"), ("moved", "to"))
TAKE_VERBS = (("picked", "up"), ("grabbed",), ("got",), ("took",))
FUNCTION_WORDS = ("the", ".")
QUESTION_WORDS = ("where", "is", "?")
# Filler: never a person, place, object, fact verb or question word ("the" and "." are shared function words).
DISTRACTOR_WORDS = (
    "a",
    "old",
    "small",
    "bright",
    "dark",
    "quiet",
    "river",
    "tree",
    "bird",
    "dog",
    "cat",
    "sun",
    "rain",
    "wind",
    "sky",
    "stone",
    "song",
    "night",
    "morning",
    "sang",
    "slept",
    "ran",
    "fell",
    "shone",
    "waited",
    "slowly",
    "loudly",
    "softly",
    "and",
    "but",
    "near",
    "over",
    "under",
    "with",
    "green",
    "blue",
    "red",
    "cold",
    "warm",
    "long",
)

FACT_CONTENT_WORDS = tuple(sorted({*PEOPLE, *PLACES, *OBJECTS, *(w for v in MOVE_VERBS + TAKE_VERBS for w in v)}))


def _build_vocab() -> tuple[str, ...]:
    words: list[str] = list(SPECIAL_TOKENS)
    for w in (
        *PEOPLE,
        *PLACES,
        *OBJECTS,
        *(x for v in MOVE_VERBS + TAKE_VERBS for x in v),
        *FUNCTION_WORDS,
        *QUESTION_WORDS,
        *DISTRACTOR_WORDS,
    ):
        if w not in words:
            words.append(w)
    return tuple(words)


VOCAB = _build_vocab()
WORD_TO_ID = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, CLS_ID, SEP_ID = WORD_TO_ID[PAD], WORD_TO_ID[CLS], WORD_TO_ID[SEP]
VOCAB_SIZE = len(VOCAB)
ANSWERS = PLACES
NUM_ANSWERS = len(ANSWERS)
ANSWER_TOKEN_IDS = tuple(WORD_TO_ID[p] for p in PLACES)
CHANCE = 1.0 / NUM_ANSWERS

assert (PAD_ID, CLS_ID, SEP_ID) == (0, 1, 2)
assert not set(DISTRACTOR_WORDS) & (set(FACT_CONTENT_WORDS) | set(QUESTION_WORDS))

_SPLIT = re.compile(r"\[(?:PAD|CLS|SEP)\]|[A-Za-z]+|[.?]")


def tokenize(text: str) -> list[str]:
    """Words (lower-cased), '.' and '?' as their own tokens; [PAD]/[CLS]/[SEP] kept as they are."""
    return [w if w.startswith("[") else w.lower() for w in _SPLIT.findall(text)]


def encode(text: str) -> list[int]:
    """Text -> ids; unknown words raise a KeyError naming the word."""
    out = []
    for w in tokenize(text):
        if w not in WORD_TO_ID:
            raise KeyError(f"{w!r} is not in the memory-task vocabulary")
        out.append(WORD_TO_ID[w])
    return out


def decode(ids) -> str:
    return " ".join(VOCAB[int(i)] for i in ids)


# ------------------------------------------------------------------------------------------ facts & filler
def _move_fact(rng: random.Random, person: str, place: str) -> list[str]:
    return [person, *rng.choice(MOVE_VERBS), "the", place, "."]


def _take_fact(rng: random.Random, person: str, obj: str) -> list[str]:
    return [person, *rng.choice(TAKE_VERBS), "the", obj, "."]


def _filler(rng: random.Random, n: int) -> list[str]:
    """n tokens of distractor sentences (3-8 words then '.'); the last sentence may be cut."""
    out: list[str] = []
    while len(out) < n:
        k = rng.randint(3, 8)
        words = [rng.choice(DISTRACTOR_WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(k), "the")
        out.extend(words)
        out.append(".")
    return out[:n]


@dataclass
class Example:
    input_ids: list[int]
    label: int  # index into ANSWERS
    answer: str
    fact_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) token spans of the facts
    question_span: tuple[int, int] = (0, 0)
    text: str = ""


def make_example(
    task: str,
    n_segments: int,
    segment_size: int,
    rng: random.Random,
    *,
    decoder: bool = False,
    return_example: bool = False,
):
    """One example of ``task`` filling ``n_segments * segment_size`` tokens. Returns (input_ids, label), or
    the full :class:`Example` with ``return_example=True``. ``decoder=True`` makes the last token the answer
    word (the question ends one token earlier)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if n_segments < 1 or segment_size < 1:
        raise ValueError("n_segments and segment_size must be >= 1")
    total = n_segments * segment_size
    place = rng.choice(PLACES)
    person = rng.choice(PEOPLE)
    if task == "reasoning":
        obj = rng.choice(OBJECTS)
        other = rng.choice([p for p in PEOPLE if p != person])
        other_place = rng.choice([p for p in PLACES if p != place])
        facts = [
            _take_fact(rng, person, obj),
            _move_fact(rng, person, place),
            _move_fact(rng, other, other_place),
        ]
        rng.shuffle(facts)
        question = ["where", "is", "the", obj, "?"]
    else:
        facts = [_move_fact(rng, person, place)]
        question = ["where", "is", person, "?"]
    tail = len(question) + (1 if decoder else 0)
    # facts must end before the last segment (n >= 2), or before the question (n == 1)
    limit = (n_segments - 1) * segment_size if n_segments >= 2 else total - tail
    fact_len = sum(len(f) for f in facts)
    if fact_len > limit or total - tail < fact_len:
        raise ValueError(
            f"{task}: {fact_len} fact tokens do not fit before the last segment "
            f"(n_segments={n_segments}, segment_size={segment_size}); use a larger segment_size"
        )
    if len(question) + (1 if decoder else 0) > segment_size:
        raise ValueError(f"segment_size={segment_size} cannot hold the question")
    n_filler = total - tail - fact_len
    filler = _filler(rng, n_filler)
    room = limit - fact_len  # filler tokens that may precede the last fact's end
    if task == "memorize":
        cuts = [0]
    else:
        cuts = sorted(rng.randint(0, room) for _ in facts)
    tokens: list[str] = []
    spans = []
    prev = 0
    for cut, fact in zip(cuts, facts, strict=True):
        tokens.extend(filler[prev:cut])
        spans.append((len(tokens), len(tokens) + len(fact)))
        tokens.extend(fact)
        prev = cut
    tokens.extend(filler[prev:])
    q_start = len(tokens)
    tokens.extend(question)
    if decoder:
        tokens.append(place)
    assert len(tokens) == total, (len(tokens), total)
    ids = [WORD_TO_ID[w] for w in tokens]
    label = PLACES.index(place)
    if not return_example:
        return ids, label
    return Example(ids, label, place, spans, (q_start, q_start + len(question)), " ".join(tokens))


class MemoryTaskDataset(Dataset):
    """``n_samples`` seeded examples of one task and length, generated up front.

    Items are ``(input_ids LongTensor (n_segments * segment_size,), label LongTensor ())``; with
    ``decoder=True`` also the causal-LM ``labels`` (-100 everywhere but the final answer token)."""

    def __init__(
        self, task: str, n_samples: int, n_segments: int, segment_size: int, seed: int = 0, decoder: bool = False
    ):
        rng = random.Random(f"{task}/{n_segments}/{segment_size}/{seed}/{int(decoder)}")
        self.task, self.n_segments, self.segment_size, self.decoder = task, n_segments, segment_size, decoder
        pairs = [make_example(task, n_segments, segment_size, rng, decoder=decoder) for _ in range(n_samples)]
        self.input_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long).reshape(n_samples, -1)
        self.labels = torch.tensor([p[1] for p in pairs], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        if self.decoder:
            return self.input_ids[i], self.labels[i], lm_labels(self.input_ids[i : i + 1])[0]
        return self.input_ids[i], self.labels[i]


def lm_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Causal-LM labels for decoder examples: -100 everywhere but the last (answer) token."""
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, -1]
    return labels


def make_batch(
    task: str, batch_size: int, n_segments: int, segment_size: int, rng: random.Random, decoder: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (B, n_segments * segment_size), labels (B,)) of fresh examples drawn from ``rng``."""
    pairs = [make_example(task, n_segments, segment_size, rng, decoder=decoder) for _ in range(batch_size)]
    ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    return ids, torch.tensor([p[1] for p in pairs], dtype=torch.long)
