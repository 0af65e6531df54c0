"""Multiple-choice questions (10-way in the paper): the true class plus distractors, lettered A, B, ...

The options of a clip depend only on (seed, clip id, true class, class list, strategy): the
RNG is seeded with a SHA-256 of the seed and the clip id (never Python's salted `hash`), so
every host, worker and run asks the same question about the same clip.

Strategies:
    "uniform"    distractors drawn uniformly without replacement from the other classes.
    "confusion"  distractors first from `confusions[true class]` (an ordered list of the
                 classes most often confused with it, e.g. from a confusion matrix), then, if
                 that list is short, uniformly from the rest.
The options are then shuffled, and `answer` is the position of the true class. With `related`
(class -> classes never offered beside it: synonyms and classes usually on the same clips,
`data_pipelines/related_classes.py`) and `other_labels` (clip id -> its other valid labels),
a clip's distractors never include another right answer.
    "fixed"      every question lists all the classes in class-list order (num_options must be
                 the number of classes), so the answer letter is a function of the class alone.
                 The toy world uses it: its tiny models, trained from scratch on a CPU, cannot
                 learn the in-context lookup of a class among shuffled options in minutes.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from distill_jax.prompts import DEFAULT_QUESTION, LETTERS, format_question

STRATEGIES = ("uniform", "confusion", "fixed")


@dataclasses.dataclass(frozen=True)
class Question:
    options: tuple[str, ...]  # option names in letter order A, B, ...
    answer: int  # index of the true class in `options`

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]

    def text(self, question_template: str = DEFAULT_QUESTION) -> str:
        """The question with its lettered option lines (distill_jax.prompts.format_question)."""
        return format_question(self.options, question_template)


def clip_rng(clip_id: str, seed: int = 0) -> np.random.Generator:
    """An RNG determined by (seed, clip id) alone, identical in every process."""
    digest = hashlib.sha256(f"{int(seed)}\x00{clip_id}".encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


class QuestionMaker:
    """Makes the question of a clip: `QuestionMaker(classes)(clip_id, true_class) -> Question`.

    Args:
        class_names: the class list the options come from (distinct names).
        num_options: options per question, 2..26 (default 10: the true class + 9 distractors).
        strategy: "uniform" or "confusion" (see the module docstring).
        confusions: for "confusion", class -> ordered confusable classes (all in `class_names`).
        seed: changes every question at once; the default 0 is the published question set.
        related: class -> classes never drawn as its distractors (names outside the list are ignored).
        other_labels: clip id -> the clip's other valid labels, never drawn as its distractors.
    """

    def __init__(self, class_names: Sequence[str], *, num_options: int = 10, strategy: str = "uniform",
                 confusions: Mapping[str, Sequence[str]] | None = None, seed: int = 0,
                 related: Mapping[str, Sequence[str]] | None = None,
                 other_labels: Mapping[str, Sequence[str]] | None = None):
        self.class_names = tuple(class_names)
        if len(set(self.class_names)) != len(self.class_names):
            dup = sorted({c for c in self.class_names if self.class_names.count(c) > 1})
            raise ValueError(f"class list has duplicate names: {dup}")
        if not 2 <= num_options <= len(LETTERS):
            raise ValueError(f"num_options must be in 2..{len(LETTERS)}, got {num_options}")
        if num_options > len(self.class_names):
            raise ValueError(f"num_options={num_options} but the class list has only "
                             f"{len(self.class_names)} classes")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy == "fixed" and num_options != len(self.class_names):
            raise ValueError(f"strategy='fixed' lists every class: num_options must be {len(self.class_names)}, "
                             f"got {num_options}")
        if strategy == "fixed" and (related or other_labels):
            raise ValueError("strategy='fixed' lists every class: it cannot leave out related classes or a clip's "
                             "other labels (config.data.exclude_related needs 'uniform' or 'confusion')")
        if strategy == "confusion" and confusions is None:
            raise ValueError("strategy='confusion' needs a `confusions` mapping")
        self._index = {name: i for i, name in enumerate(self.class_names)}
        self.confusions = {}
        for name, similar in (confusions or {}).items():
            unknown = [c for c in [name, *similar] if c not in self._index]
            if unknown:
                raise ValueError(f"confusions for {name!r} name classes not in the class list: {unknown}")
            self.confusions[name] = tuple(dict.fromkeys(c for c in similar if c != name))
        self.num_options, self.strategy, self.seed = num_options, strategy, int(seed)
        self.related = {a: frozenset(bs) for a, bs in (related or {}).items()}
        self.other_labels = {str(c): frozenset(ls) for c, ls in (other_labels or {}).items()}

    def excluded(self, clip_id: str, true_class: str) -> frozenset[str]:
        """The classes never offered as distractors of this clip: related to its class, or its other labels."""
        return (self.related.get(true_class, frozenset()) | self.other_labels.get(str(clip_id), frozenset())) - {
            true_class}

    def __call__(self, clip_id: str, true_class: str) -> Question:
        if true_class not in self._index:
            raise ValueError(f"clip {clip_id}: label {true_class!r} is not in the class list "
                             f"({len(self.class_names)} classes)")
        if self.strategy == "fixed":
            return Question(options=self.class_names, answer=self._index[true_class])
        rng = clip_rng(clip_id, self.seed)
        needed = self.num_options - 1
        excluded = self.excluded(clip_id, true_class)
        distractors = []
        if self.strategy == "confusion":
            distractors = [c for c in self.confusions.get(true_class, ()) if c not in excluded][:needed]
        rest = [c for c in self.class_names if c != true_class and c not in distractors and c not in excluded]
        if len(rest) < needed - len(distractors):
            raise ValueError(f"clip {clip_id} ({true_class!r}): only {len(rest) + len(distractors)} of the "
                             f"{len(self.class_names)} classes are neither its class nor related to it "
                             f"({sorted(excluded)}), fewer than the {needed} distractors of a {self.num_options}-way "
                             "question")
        picks = rng.choice(len(rest), size=needed - len(distractors), replace=False)
        options = [true_class, *distractors, *(rest[i] for i in picks)]
        order = rng.permutation(len(options))
        options = tuple(options[i] for i in order)
        return Question(options=options, answer=int(np.flatnonzero(order == 0)[0]))
