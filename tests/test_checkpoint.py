"""A run restarted from its latest checkpoint ends with the same LoRA weights and saw the same batches."""
import grain
import jax
import numpy as np
from flax import nnx

from distill_jax import sharding
from distill_jax.models import lora
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from distill_jax.train.checkpoint import TrainCheckpointer
from distill_jax.train.loop import OptimizerConfig, init_state, make_optimizer, make_step
from distill_jax.train.step import distill_objective

LETTERS = np.arange(10, 20)
STEPS = 12


def _records(n=40, seed=0):
    rng = np.random.RandomState(seed)
    return [{"record": np.int32(i), "input_ids": rng.randint(30, 256, 10).astype(np.int32),
             "switch_closed": np.bool_(rng.rand() < 0.5), "teacher_letter": np.int32(rng.randint(10)),
             "teacher_logits": rng.randn(10).astype(np.float32), "student_letter": np.int32(rng.randint(10)),
             "valid": np.int32(1)} for i in range(n)]


def _iterator():
    ds = grain.MapDataset.source(_records()).shuffle(seed=3).repeat(None).batch(4)
    return iter(ds.to_iter_dataset())


def _fresh():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4), rngs=nnx.Rngs(1))
    sharding.shard_model(model, mesh)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=STEPS))
    graphdef, state, frozen = init_state(model, tx, mesh)
    step = make_step(graphdef, tx, distill_objective(LETTERS))
    inputs = lambda batch: {k: v for k, v in batch.items() if k != "record"}
    return state, lambda state, batch: step(state, frozen, inputs(batch))


def _run(state, step_fn, iterator, until, checkpointer=None, seen=None):
    while int(state["step"]) < until:
        batch = next(iterator)
        seen.append(batch["record"].tolist())
        state, metrics = step_fn(state, batch)
        assert np.isfinite(float(metrics["loss"]))
        if checkpointer is not None:
            checkpointer.save(state, iterator)
    return state


def test_restart_from_latest_checkpoint_equals_uninterrupted_run(tmp_path):
    state, step_fn = _fresh()
    seen_uninterrupted = []
    expected = _run(state, step_fn, _iterator(), STEPS, seen=seen_uninterrupted)

    # A run that dies after step 8 with checkpoints every 3 steps (latest: step 6).
    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), every=3)
    state, step_fn = _fresh()
    seen_first = []
    _run(state, step_fn, _iterator(), 8, checkpointer, seen_first)
    checkpointer.close()

    # The restart: a fresh state and iterator, restored from the checkpoint directory.
    checkpointer = TrainCheckpointer(str(tmp_path / "ckpt"), every=3)
    assert checkpointer.latest_step() == 6
    state, step_fn = _fresh()
    iterator = _iterator()
    state = checkpointer.restore_latest(state, iterator)
    assert int(state["step"]) == 6
    seen_second = []
    resumed = _run(state, step_fn, iterator, STEPS, checkpointer, seen_second)
    checkpointer.close()

    assert seen_first[:6] + seen_second == seen_uninterrupted  # the same batches, in the same order
    for a, b in zip(jax.tree.leaves(expected["params"]), jax.tree.leaves(resumed["params"])):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-6
    assert np.abs(np.asarray(jax.tree.leaves(resumed["params"])[1])).max() > 0  # training moved the weights
