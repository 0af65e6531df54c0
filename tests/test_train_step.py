"""The trainer's pure step on the letter objective: learns, touches only LoRA, gives the same result
sharded on 8 devices, accumulates gradients exactly, and refuses a non-finite update."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from distill_jax import sharding
from distill_jax.models import lora
from distill_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM
from distill_jax.train.loop import OptimizerConfig, init_state, make_optimizer, make_step
from distill_jax.train.step import distill_objective

LETTERS = np.arange(10, 20)


def _mesh(shape=None):
    if shape is None:
        return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return sharding.make_mesh(shape)


def _setup(accumulate=1, mesh=None, tx=None):
    mesh = mesh or _mesh()
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    sharding.shard_model(model, mesh)
    tx = tx or make_optimizer(OptimizerConfig(learning_rate=5e-3, warmup_steps=2, total_steps=40,
                                              accumulate_steps=accumulate))
    graphdef, state, frozen = init_state(model, tx, mesh)
    return graphdef, state, frozen, tx


def _batch(seed=0, size=8):
    rng = np.random.RandomState(seed)
    ids = rng.randint(30, 256, (size, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::3, :4] = 0
    return {"input_ids": ids, "attention_mask": mask, "switch_closed": rng.rand(size) < 0.5,
            "teacher_letter": rng.randint(0, 10, size).astype(np.int32),
            "teacher_logits": rng.randn(size, 10).astype(np.float32),
            "student_letter": rng.randint(0, 10, size).astype(np.int32), "valid": np.ones(size, np.int32)}


def test_steps_lower_the_loss_and_change_only_lora():
    graphdef, state, frozen, tx = _setup()
    frozen_before = jax.tree.map(np.asarray, frozen)
    step = make_step(graphdef, tx, distill_objective(LETTERS, mode="logits", temperature=2.0))
    batch = _batch()
    losses = []
    for _ in range(15):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        assert bool(metrics["finite"])
    assert losses[-1] < 0.85 * losses[0], losses  # 15 steps of a rank-4 adapter on a frozen random model
    assert int(state["step"]) == 15
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert {k for k, _ in nnx.to_flat_state(state["params"])} == {
        k for k, v in nnx.to_flat_state(nnx.state(nnx.merge(graphdef, state["params"], state["mutable"], frozen),
                                                 nnx.LoRAParam))}


def test_sharded_train_step_equals_single_device():
    # Plain SGD: Adam's m / sqrt(v) magnifies reduction-order noise in near-zero gradients,
    # which would hide whether the sharded program computes the same gradients.
    batch = _batch(seed=1)
    results = []
    for mesh in (_mesh(), _mesh({"data": 2, "fsdp": 2, "tensor": 2})):
        graphdef, state, frozen, tx = _setup(mesh=mesh, tx=optax.sgd(0.5))
        step = make_step(graphdef, tx, distill_objective(LETTERS))
        placed = jax.device_put(batch, jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
        with jax.set_mesh(mesh):
            state, _ = step(state, frozen, placed)
            state, metrics = step(state, frozen, placed)
        results.append((state, frozen, metrics))
    (single, _, single_metrics), (out, frozen, metrics) = results
    assert frozen["model"]["layers"]["mlp"]["up_proj"]["kernel"][...].sharding.spec == jax.P(None, "fsdp", "tensor")
    np.testing.assert_allclose(float(metrics["loss"]), float(single_metrics["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single["params"]), jax.tree.leaves(out["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_gradient_accumulation_equals_one_big_batch():
    """Three optimizer updates from 3 x 2 half batches equal three from the 3 whole batches, and the
    weights moved. Plain SGD at a constant rate: warmup from 0 would make the first update zero,
    and Adam's m / sqrt(v) magnifies the reduction-order noise of averaging two halves."""
    assert isinstance(make_optimizer(OptimizerConfig(accumulate_steps=2)), optax.MultiSteps)
    constant = lambda k: optax.MultiSteps(optax.sgd(2.0), every_k_schedule=k) if k > 1 else optax.sgd(2.0)
    graphdef, state, frozen, tx = _setup(tx=constant(2))
    initial = jax.tree.map(np.asarray, state["params"])
    step = make_step(graphdef, tx, distill_objective(LETTERS))
    bigs = [_batch(seed=2, size=8), _batch(seed=5, size=8), _batch(seed=6, size=8)]
    for big in bigs:
        for half in (jax.tree.map(lambda x: x[:4], big), jax.tree.map(lambda x: x[4:], big)):
            state, _ = step(state, frozen, half)
    graphdef1, state1, frozen1, tx1 = _setup(tx=constant(1))
    step1 = make_step(graphdef1, tx1, distill_objective(LETTERS))
    for big in bigs:
        state1, _ = step1(state1, frozen1, big)
    moved = [float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(jax.tree.leaves(state1["params"]),
                                                                       jax.tree.leaves(initial))]
    assert min(moved) > 1e-5 and max(moved) > 1e-2, moved  # every LoRA factor moved (B first, then A)
    for a, b, start in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state1["params"]),
                           jax.tree.leaves(initial)):
        # The updates agree to float32 rounding: of the weights (1e-7), and of the summed gradients, whose
        # per-token terms are as large as the leaf's largest update (1e-5 of it; the scanned layers'
        # backward sums them in another order than the unrolled one did).
        update = np.asarray(b) - start
        np.testing.assert_allclose(np.asarray(a) - start, update, rtol=1e-4,
                                   atol=1e-7 + 1e-5 * np.abs(update).max())


def test_a_non_finite_step_is_not_applied():
    """A NaN in the targets makes the loss NaN: the step reports it and keeps the weights and
    the optimizer state as they were (a checkpoint after it would still be a good one)."""
    graphdef, state, frozen, tx = _setup()
    step = make_step(graphdef, tx, distill_objective(LETTERS, mode="logits"))
    state, metrics = step(state, frozen, _batch())
    assert bool(metrics["finite"])
    before = jax.tree.map(np.asarray, (state["params"], state["opt"]))
    bad = _batch(seed=3)
    bad["teacher_logits"][2, 4] = np.nan
    bad["switch_closed"][2] = True
    state, metrics = step(state, frozen, bad)
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
    assert int(metrics["nonfinite_run"]) == 1 and int(metrics["nonfinite_skips"]) == 1
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state["params"], state["opt"]))):
        np.testing.assert_array_equal(a, np.asarray(b))
    state, metrics = step(state, frozen, _batch(seed=4))
    assert bool(metrics["finite"]) and int(metrics["nonfinite_run"]) == 0 and int(metrics["nonfinite_skips"]) == 1


def _nan_batch(seed):
    bad = _batch(seed=seed)
    bad["teacher_logits"][:] = np.nan
    bad["switch_closed"][:] = True
    return bad


def _train(batches, steps, workdir=None, max_nonfinite=3):
    """The trainer (loop.train) on a fresh tiny LoRA model over a Grain iterator of `batches`;
    returns the trained LoRA weights."""
    import grain

    from distill_jax.train import loop

    mesh = _mesh()
    model = Qwen2ForCausalLM(Qwen2Config.preset("tiny"), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoraConfig(rank=4, alpha=8.0), rngs=nnx.Rngs(1))
    sharding.shard_model(model, mesh)
    with jax.set_mesh(mesh):
        model = loop.train(model, distill_objective(LETTERS, mode="logits"),
                           iter(grain.MapDataset.source(batches).to_iter_dataset()),
                           optimizer=OptimizerConfig(learning_rate=5e-3, schedule="constant"),
                           loop=loop.LoopConfig(steps=steps, log_every=1, checkpoint_every=2,
                                                max_nonfinite_steps=max_nonfinite),
                           mesh=mesh, name="t", workdir=workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


def test_a_nan_batch_is_skipped_and_a_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    """The trainer skips a NaN batch (weights after it == weights before it), saves only finite
    checkpoints, and a run resumed from the checkpoint just after the NaN step ends equal to
    an uninterrupted one; 3 NaN steps in a row stop the run naming the step and the checkpoint."""
    from distill_jax.train.loop import NonFiniteError

    batches = [_batch(seed=10 + i) for i in range(6)]
    batches[3] = _nan_batch(3)  # step 4
    before, after = _train(batches, 3), _train(batches, 4)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert "not finite at step 4; the update was skipped (1 in a row)" in capsys.readouterr().out
    straight = _train(batches, 6)
    _train(batches, 4, workdir=tmp_path / "resumed")  # checkpoints at steps 2 and 4 (just after the NaN)
    import orbax.checkpoint as ocp
    saved = ocp.StandardCheckpointer().restore(tmp_path / "resumed" / "checkpoints" / "4" / "train")
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved["params"])) and int(saved["nonfinite_total"]) == 1
    resumed = _train(batches, 6, workdir=tmp_path / "resumed")
    assert "t: resumed from step 4" in capsys.readouterr().out
    assert all(np.all(np.isfinite(x)) for x in resumed)
    for a, b in zip(straight, resumed):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(straight, after)) > 1e-3  # steps 5, 6 moved it

    stuck = batches[:2] + [_nan_batch(20 + i) for i in range(4)]
    with pytest.raises(NonFiniteError, match=r"t: 3 consecutive non-finite steps up to step 5 .* The last "
                                             r"checkpoint is step 4 in .*stuck"):
        _train(stuck, 6, workdir=tmp_path / "stuck")
