"""data_pipelines.questions: deterministic per clip (across processes), the answer letter points
at the true class, options distinct and from the class list, both option strategies."""
import collections
import json
import os
import subprocess
import sys

import pytest

from data_pipelines.questions import QuestionMaker, clip_rng
from distill_jax.prompts import LETTERS

CLASSES = [f"class {i:02d}" for i in range(30)]


def test_answer_letter_points_at_true_class_and_options_are_distinct():
    maker = QuestionMaker(CLASSES)
    for i in range(300):
        true = CLASSES[i % len(CLASSES)]
        q = maker(f"clip{i}", true)
        assert len(q.options) == 10 and len(set(q.options)) == 10
        assert set(q.options) <= set(CLASSES)
        assert q.options[q.answer] == true and LETTERS.index(q.answer_letter) == q.answer
        assert f"\n{q.answer_letter}. {true}\n" in "\n" + q.text() + "\n"


def test_deterministic_across_calls_makers_and_processes():
    maker = QuestionMaker(CLASSES)
    ids = [f"yt{i}_000010" for i in range(20)]
    here = [maker(c, CLASSES[3]).options for c in ids]
    assert here == [QuestionMaker(CLASSES)(c, CLASSES[3]).options for c in ids]
    # Another interpreter with another hash seed (what another host or run is) asks the same.
    code = ("import json, sys; from data_pipelines.questions import QuestionMaker;"
            "classes, ids = json.loads(sys.argv[1]);"
            "print(json.dumps([QuestionMaker(classes)(c, classes[3]).options for c in ids]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps([CLASSES, ids])], env=env, check=True,
                         capture_output=True, text=True).stdout
    assert [tuple(o) for o in json.loads(out)] == here
    # Different clips and different seeds give different questions.
    assert len(set(here)) == len(here)
    assert QuestionMaker(CLASSES, seed=1)(ids[0], CLASSES[3]).options != here[0]


def test_uniform_distractors_and_answer_positions():
    maker = QuestionMaker(CLASSES)
    distractors, positions = collections.Counter(), collections.Counter()
    n = 2900
    for i in range(n):
        q = maker(f"c{i}", CLASSES[0])
        distractors.update(o for o in q.options if o != CLASSES[0])
        positions[q.answer] += 1
    assert CLASSES[0] not in distractors and len(distractors) == 29
    expected = n * 9 / 29  # 900 per class
    assert all(abs(c - expected) < 5 * expected ** 0.5 for c in distractors.values()), distractors
    assert all(abs(c - n / 10) < 5 * (n / 10) ** 0.5 for c in positions.values()), positions


def test_confusion_strategy_uses_the_confusable_classes_first():
    confusions = {CLASSES[0]: [CLASSES[5], CLASSES[6], CLASSES[7]],
                  CLASSES[1]: CLASSES[2:20]}  # more than 9: the first 9 are the distractors
    maker = QuestionMaker(CLASSES, strategy="confusion", confusions=confusions)
    for i in range(50):
        q = maker(f"c{i}", CLASSES[0])
        assert {CLASSES[5], CLASSES[6], CLASSES[7]} <= set(q.options) and len(set(q.options)) == 10
        q = maker(f"c{i}", CLASSES[1])
        assert set(q.options) == {CLASSES[1], *CLASSES[2:11]}
        q = maker(f"c{i}", CLASSES[9])  # no confusion list: uniform
        assert len(set(q.options)) == 10 and q.options[q.answer] == CLASSES[9]


def test_fewer_options():
    q = QuestionMaker(CLASSES[:4], num_options=4)("x", CLASSES[2])
    assert sorted(q.options) == sorted(CLASSES[:4]) and q.options[q.answer] == CLASSES[2]


def test_fixed_lists_every_class_in_order():
    maker = QuestionMaker(CLASSES[:20], num_options=20, strategy="fixed")
    for i, true in enumerate(CLASSES[:20]):
        q = maker(f"clip{i}", true)
        assert q.options == tuple(CLASSES[:20]) and q.answer == i and q.answer_letter == LETTERS[i]
    assert "T. " + CLASSES[19] in q.text()
    with pytest.raises(ValueError, match="num_options must be 20"):
        QuestionMaker(CLASSES[:20], num_options=10, strategy="fixed")


def test_bad_input_is_named():
    maker = QuestionMaker(CLASSES)
    with pytest.raises(ValueError, match=r"clip x: label 'dog' is not in the class list"):
        maker("x", "dog")
    with pytest.raises(ValueError, match="num_options=10 but the class list has only 5"):
        QuestionMaker(CLASSES[:5])
    with pytest.raises(ValueError, match="not in the class list: \\['cat'\\]"):
        QuestionMaker(CLASSES, strategy="confusion", confusions={CLASSES[0]: ["cat"]})
    with pytest.raises(ValueError, match="strategy must be one of"):
        QuestionMaker(CLASSES, strategy="nearest")
    with pytest.raises(ValueError, match="duplicate"):
        QuestionMaker(CLASSES + [CLASSES[0]])


def test_clip_rng_depends_on_id_and_seed_only():
    assert clip_rng("a", 0).integers(1 << 30) == clip_rng("a", 0).integers(1 << 30)
    assert clip_rng("a", 0).integers(1 << 30) != clip_rng("b", 0).integers(1 << 30)
    assert clip_rng("a", 0).integers(1 << 30) != clip_rng("a", 1).integers(1 << 30)
