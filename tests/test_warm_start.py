"""The warm start's scrambled pretraining labels: the toy audio model's "unlearned mapping"."""
import collections

import numpy as np

from data_pipelines import toy_world as tw
from distill_jax.stages.warm_start import PretrainTargets


def pretrain_letters(batch, scrambled, seed):
    """The pipeline's per-clip targets step over a batch's rows."""
    targets = PretrainTargets(scrambled, seed, num_letters=10)
    rows = [targets({k: v[i] for k, v in batch.items()}) for i in range(len(batch["label"]))]
    assert all(r["switch_closed"] and r["student_letter"] == r["teacher_letter"] for r in rows)
    return np.asarray([r["teacher_letter"] for r in rows])


def _batch(labels, prefix="clip"):
    labels = np.asarray(labels)
    return {"label": labels, "answer": labels.copy(), "clip_id": np.array([f"{prefix}{i}" for i in range(len(labels))])}


def test_scrambled_letters_carry_no_information_within_a_group():
    scrambled = {3: (3, 5, 7), 5: (3, 5, 7), 7: (3, 5, 7)}
    labels = np.tile([3, 5, 7, 0, 1], 1200)
    letters = pretrain_letters(_batch(labels), scrambled, seed=0)
    outside = ~np.isin(labels, (3, 5, 7))
    np.testing.assert_array_equal(letters[outside], labels[outside])  # other classes keep their true letter
    inside = letters[~outside]
    assert set(inside) == {3, 5, 7}
    for true in (3, 5, 7):  # whatever the true class, each group letter a third of the time
        counts = collections.Counter(letters[labels == true])
        assert all(abs(counts[k] / 1200 - 1 / 3) < 0.05 for k in (3, 5, 7)), (true, counts)


def test_scrambled_letters_are_fixed_per_clip_and_seed():
    scrambled = {0: (0, 1), 1: (0, 1)}
    batch = _batch([0, 1] * 50)
    first = pretrain_letters(batch, scrambled, seed=0)
    np.testing.assert_array_equal(first, pretrain_letters(batch, scrambled, seed=0))
    # The same clip in another batch, at another row, gets the same letter: once per clip.
    shuffled = {k: v[::-1] for k, v in batch.items()}
    np.testing.assert_array_equal(pretrain_letters(shuffled, scrambled, seed=0), first[::-1])
    assert not np.array_equal(pretrain_letters(batch, scrambled, seed=1), first)  # another world seed
    np.testing.assert_array_equal(batch["answer"], np.array([0, 1] * 50))  # the batch itself is not changed


def test_world_groups_name_real_classes():
    names = {c.name for c in tw.CLASSES}
    for group in tw.PRETRAIN_SCRAMBLED["audio"]:
        assert set(group) <= names and len(group) >= 2
        assert len({tw.CLASSES[[c.name for c in tw.CLASSES].index(n)].unseen for n in group}) == 1
