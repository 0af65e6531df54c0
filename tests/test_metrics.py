"""Our TensorBoard event files (tensorboardX) read back through TensorBoard's own loader; the JSONL log parses."""
import glob
import json
import os

import pytest
from tensorboard.backend.event_processing import event_file_loader

from distill_jax.train.metrics import MetricWriter


def test_event_file_and_jsonl_round_trip(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(1, {"loss": 2.5, "train/lr": 1e-4})
    writer.write(2, {"loss": float("nan")})
    writer.close()
    (events,) = glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    read = list(event_file_loader.LegacyEventFileLoader(events).Load())  # raw events, no data_compat migration
    assert read[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in read[1:] for v in e.summary.value]
    assert scalars[:2] == [(1, "loss", 2.5), (1, "train/lr", pytest.approx(1e-4))]
    assert scalars[2][0] == 2 and scalars[2][2] != scalars[2][2]  # NaN survives as NaN
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert lines[0]["loss"] == 2.5 and lines[1]["loss"] == "nan"
