"""Evaluate stage: every valid clip scored once, accuracy tables and the modality gap from hand-made records."""
import numpy as np
from flax import nnx

from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from distill_jax.stages import evaluate

CLASSES = ["dog", "cat", "car"]


def test_score_batches_scores_each_valid_clip_once():
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    letters = list(range(10, 20))
    batches = [{"input_ids": rng.randint(30, 256, (4, 9)), "attention_mask": np.ones((4, 9), np.int32),
                "clip_id": np.asarray([f"c{b}{i}" for i in range(4)]), "valid": np.asarray([1, 1, 1, b == 0]),
                "label": np.asarray([0, 1, 2, 0]), "answer": rng.randint(0, 10, 4)} for b in range(2)]
    inputs = lambda b: {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    records = evaluate.score_batches(model, batches, letters, inputs)
    assert [r["clip_id"] for r in records] == ["c00", "c01", "c02", "c03", "c10", "c11", "c12"]
    logits = np.asarray(model(input_ids=batches[1]["input_ids"]))[:, -1, letters]
    np.testing.assert_allclose(records[5]["letter_logits"], logits[1], atol=1e-5)
    assert records[5]["predicted"] == int(np.argmax(logits[1]))


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
