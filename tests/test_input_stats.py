"""input_stats: the shapes the programs saw, the padding they carried, and a log a rerun leaves alone."""
import json
import os

import numpy as np

from distill_jax import input_stats


def _batch(batch, length, real):
    mask = np.zeros((batch, length), np.int32)
    for row, n in enumerate(real):
        mask[row, :n] = 1
    return {"input_ids": np.zeros((batch, length), np.int32), "attention_mask": mask, "clip_id": np.array(["x"] * batch)}


def test_shapes_padding_and_summary(tmp_path):
    log = input_stats.InputLog(tmp_path / "input_shapes.json")
    observe = log.observer("audio", "score", "test", bound=3)
    observe(_batch(2, 8, [8, 4]))
    observe(_batch(2, 8, [2, 2]))
    observe(_batch(2, 16, [16, 0]))
    log.save()
    saved = json.load(open(tmp_path / "input_shapes.json"))
    assert saved["programs"]["audio/score"]["shapes"] == [
        {"attention_mask": [2, 8], "input_ids": [2, 8]}, {"attention_mask": [2, 16], "input_ids": [2, 16]}]
    assert saved["padding"]["audio/score/test"] == {"tokens": [32, 64]}
    summary = input_stats.summary(saved)
    assert summary["programs"]["audio/score"] == {"shapes": 2, "bound": 3, "within_bound": True, "batch_sizes": [2]}
    assert summary["padding"]["audio/score/test"] == {"tokens": 0.5}


def test_global_shapes_on_several_hosts():
    """A host's batch of 4 on 2 processes is the program's batch of 8."""
    assert input_stats.signature(_batch(4, 8, [1] * 4), processes=2)["input_ids"] == [8, 8]


def test_a_rerun_that_sees_nothing_leaves_the_file(tmp_path):
    path = tmp_path / "input_shapes.json"
    first = input_stats.InputLog(path)
    first.observer("visual", "score", "analysis", bound=2)(_batch(1, 4, [3]))
    first.save()
    stamp = os.stat(path).st_mtime_ns
    again = input_stats.InputLog(path)
    again.observer("visual", "score", "analysis", bound=2)  # a resumed stage that scores nothing
    again.save()
    assert os.stat(path).st_mtime_ns == stamp
    assert json.load(open(path))["padding"]["visual/score/analysis"] == {"tokens": [3, 4]}
    more = input_stats.InputLog(path)
    more.observer("visual", "score", "test", bound=2)(_batch(1, 4, [4]))
    more.save()
    saved = json.load(open(path))
    assert saved["padding"] == {"visual/score/analysis": {"tokens": [3, 4]}, "visual/score/test": {"tokens": [4, 4]}}


def test_save_prints_what_was_observed(tmp_path, capsys):
    log = input_stats.InputLog(tmp_path / "input_shapes.json")
    observe = log.observer("audio", "score", "test", bound=3)
    observe(_batch(2, 8, [8, 4]))
    observe(_batch(2, 16, [16, 4]))
    log.save()
    assert capsys.readouterr().out == "inputs: audio/score on test: 2 input shapes (at most 3), tokens 33.3% padding\n"  # 32 of 48
    log.save()  # nothing new observed: nothing printed
    assert capsys.readouterr().out == ""
