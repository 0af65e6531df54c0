"""Label stage: switch modes decide per clip, and batches get the right targets."""
import numpy as np
import pytest

from distill_jax.stages.label import JoinTargets, make_labels


def rec(clip_id, answer, predicted):
    logits = np.zeros(10)
    logits[predicted] = 3.0
    return {"clip_id": clip_id, "label": 0, "answer": answer, "predicted": predicted, "letter_logits": logits.tolist()}


TEACHER = [rec("a", 1, 1), rec("b", 2, 2), rec("c", 3, 4)]
STUDENT = [rec("b", 2, 5), rec("a", 1, 1), rec("c", 3, 3)]


def test_switch_modes_decide_per_clip():
    probs = {"a": 0.9, "b": 0.2, "c": 0.5}
    closed = lambda labels: [r["switch_closed"] for r in labels]
    assert closed(make_labels(TEACHER, STUDENT, mode="learned", switch_probs=probs, threshold=0.5)) == [True, False, True]
    assert closed(make_labels(TEACHER, STUDENT, mode="always")) == [True, True, True]
    assert closed(make_labels(TEACHER, STUDENT, mode="never")) == [False, False, False]
    assert closed(make_labels(TEACHER, STUDENT, mode="oracle")) == [False, True, False]  # only b: teacher right, student wrong
    labels = make_labels(TEACHER, STUDENT, mode="always")
    assert [(r["teacher_letter"], r["student_letter"]) for r in labels] == [(1, 1), (2, 5), (4, 3)]


def test_targets_joined_by_clip_id_and_errors():
    labels = {r["clip_id"]: r for r in make_labels(TEACHER, STUDENT, mode="oracle")}
    join = JoinTargets(labels)
    rows = [join({"clip_id": c}) for c in ("c", "b", "b")]
    np.testing.assert_array_equal([r["switch_closed"] for r in rows], [False, True, True])
    np.testing.assert_array_equal([r["teacher_letter"] for r in rows], [4, 2, 2])
    np.testing.assert_array_equal([r["student_letter"] for r in rows], [3, 5, 5])
    assert rows[0]["teacher_logits"].shape == (10,) and rows[0]["teacher_logits"].dtype == np.float32
    with pytest.raises(KeyError, match="clip z has no label record"):
        join({"clip_id": "z"})
    with pytest.raises(ValueError, match="'sometimes'"):
        make_labels(TEACHER, STUDENT, mode="sometimes")
    with pytest.raises(ValueError, match="scored different clips"):
        make_labels(TEACHER, STUDENT[:2], mode="always")
