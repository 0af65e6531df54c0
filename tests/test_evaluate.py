"""Evaluate stage: every valid clip scored once, accuracy tables and the modality gap from hand-made records."""
import jax
import numpy as np
from flax import nnx

from distill_jax import scoring, sharding
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from distill_jax.stages import evaluate
from distill_jax.train.step import plain_inputs

CLASSES = ["dog", "cat", "car"]


def test_score_split_scores_each_valid_clip_once_in_record_order(tmp_path):
    """Placed over 8 devices, each valid clip scored once, records merged in the split's record
    order (the `index` the pipeline gives), resumable chunks, a finished file read back as is."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model = sharding.shard_model(Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0)), mesh)
    rng = np.random.RandomState(0)
    letters = list(range(10, 20))
    batches = [{"input_ids": rng.randint(30, 256, (8, 9)).astype(np.int32), "attention_mask": np.ones((8, 9), np.int32),
                "clip_id": np.asarray([f"c{8 * (1 - b) + i:02d}" for i in range(8)]),
                "index": np.arange(8) + 8 * (1 - b), "valid": np.asarray([1] * 7 + [b == 0]),
                "label": np.asarray([0, 1, 2, 0] * 2), "answer": rng.randint(0, 10, 8)} for b in range(2)]
    out = tmp_path / "records.jsonl"
    with jax.set_mesh(mesh):
        compute = scoring.letter_scorer(model, letters, plain_inputs, mesh)
        records = scoring.score_split(iter(batches), compute, scoring.letter_record, out, mesh=mesh, num_batches=2,
                                      chunk_batches=1)
    assert [r["clip_id"] for r in records] == [f"c{i:02d}" for i in range(7)] + [f"c{i:02d}" for i in range(8, 16)]
    assert evaluate.read_records(out) == records and not list(tmp_path.glob("*.parts-*"))
    logits = np.asarray(model(input_ids=batches[1]["input_ids"]))[:, -1, letters]  # the clips c00..c07
    np.testing.assert_allclose(records[5]["letter_logits"], logits[5], atol=1e-5)
    assert records[5]["predicted"] == int(np.argmax(logits[5])) and "index" not in records[5]
    assert scoring.score_split(iter([]), None, None, out, mesh=mesh, num_batches=0) == records  # done: read back


def test_accuracy_and_modality_gap_on_hand_made_records(tmp_path):
    def rec(label, answer, predicted):
        return {"clip_id": "x", "label": label, "answer": answer, "predicted": predicted, "letter_logits": []}

    audio = [rec(0, 1, 1), rec(0, 2, 3), rec(1, 0, 0), rec(1, 4, 4), rec(2, 5, 1)]
    visual = [rec(0, 1, 1), rec(0, 2, 2), rec(1, 0, 3), rec(1, 4, 4), rec(2, 5, 5)]
    a, v = evaluate.accuracy(audio, CLASSES), evaluate.accuracy(visual, CLASSES)
    assert a["overall"] == 0.6 and v["overall"] == 0.8
    assert a["per_class"]["dog"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    gap = evaluate.modality_gap(a, v)
    assert [(r["class"], r["difference"]) for r in gap] == [("car", 1.0), ("dog", 0.5), ("cat", -0.5)]
    path = str(tmp_path / "out" / "audio_test.jsonl")
    evaluate.write_records(path, audio)
    assert evaluate.read_records(path) == audio
    table = evaluate.markdown_table(gap, ["class", "audio", "visual", "difference"])
    assert "| car | 0.0 | 100.0 | 100.0 |" in table
