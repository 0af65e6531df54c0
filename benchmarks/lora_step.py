"""LoRA distill-style training step: our jitted step vs HF + peft (PyTorch eager), same machine, same run.

One step = forward + backward + AdamW update of the LoRA parameters only. --loss=distill
(default) is the distill step's loss: cross-entropy of 10 letter logits at the last position
(ours: `hidden_states` + `logits(token_ids=letters)`; HF: `logits_to_keep=1`, the cheapest HF
way, then the letter columns). --loss=lm is next-token cross-entropy over every position and
the whole vocabulary. Both sides start from the same random Qwen2 weights (ours loaded from
the HF model through our converter). --remat sets our decoder layers' remat policy.
--attention=repeat_kv measures a layout question (issue 18): our decoder's attention with the
key/value heads repeated to the query heads before `jax.nn.dot_product_attention` (the layout
HF's SDPA path uses), instead of the grouped [B, kv_heads, T, groups, T] scores XLA builds for
grouped-query attention. The same math; a measurement only, the models are not changed.

    python benchmarks/lora_step.py                      # small config, runs on 2 CPU cores
    python benchmarks/lora_step.py --hidden=512 --layers=8 --seq=256

Prints a table and appends a JSON line to benchmarks/results.jsonl.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from common import (add_language_model_args, append_result, machine, median_ms, print_table,  # noqa: E402
                    time_steps, versions)
from distill_jax.convert import load_hf  # noqa: E402
from distill_jax.models import lora  # noqa: E402


LETTERS = list(range(10, 20))  # the 10 answer letters' token ids (any 10 ids of the vocabulary)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_language_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--loss", choices=["distill", "lm"], default="distill")
    p.add_argument("--remat", choices=["none", "dots", "full"], default="none")
    p.add_argument("--attention", choices=["grouped", "repeat_kv"], default="grouped")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
    return p.parse_args()


def build_hf(args, path):
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    return model


def torch_step_fn(hf_model, args, ids, mask):
    import peft
    import torch

    torch.set_num_threads(args.torch_threads)
    peft_model = peft.get_peft_model(hf_model, peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=list(lora.DEFAULT_TARGETS)))
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)

    letters_t, targets_t = torch.tensor(LETTERS), torch.tensor(np.arange(args.batch) % len(LETTERS))

    def step():
        optimizer.zero_grad(set_to_none=True)
        if args.loss == "distill":
            logits = peft_model(input_ids=ids_t, attention_mask=mask_t, logits_to_keep=1).logits[:, -1, letters_t]
            loss = torch.nn.functional.cross_entropy(logits, targets_t)
        else:
            logits = peft_model(input_ids=ids_t, attention_mask=mask_t).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss)

    return step, sum(p.numel() for p in params)


def use_repeated_kv_heads() -> None:
    """Our decoder's attention with K/V repeated to the query heads (--attention=repeat_kv)."""
    from distill_jax.layers import attention as attention_lib
    from distill_jax.models import qwen2

    def attention(query, key, value, mask, **kw):
        repeats = query.shape[2] // key.shape[2]
        return attention_lib.attention(query, jnp.repeat(key, repeats, 2), jnp.repeat(value, repeats, 2), mask, **kw)

    qwen2.attention = attention


def jax_step_fn(path, args, ids, mask):
    if args.attention == "repeat_kv":
        use_repeated_kv_heads()
    model = load_hf(path, remat=args.remat)
    lora.apply_lora(model, lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank), rngs=nnx.Rngs(0))
    graphdef, lora_params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(lora_params)

    @partial(jax.jit, donate_argnums=(0, 1))
    def train_step(lora_params, opt_state, frozen, ids, mask):
        def loss_fn(lora_params):
            model = nnx.merge(graphdef, lora_params, frozen)
            if args.loss == "distill":
                hidden = model.hidden_states(input_ids=ids, attention_mask=mask)[:, -1]
                logits = model.logits(hidden, jnp.asarray(LETTERS))
                return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            logits = model(input_ids=ids, attention_mask=mask)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(lora_params)
        updates, opt_state = tx.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, loss

    targets = jnp.asarray(np.arange(args.batch) % len(LETTERS))
    state = {"lora": lora_params, "opt": opt_state}
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)

    def step():
        state["lora"], state["opt"], loss = train_step(state["lora"], state["opt"], frozen, ids_j, mask_j)
        return float(loss.block_until_ready())

    n = sum(x.size for x in jax.tree.leaves(lora_params))
    return step, n


def main():
    args = parse_args()
    rng = np.random.RandomState(0)
    ids = rng.randint(0, args.vocab, (args.batch, args.seq))
    mask = np.ones_like(ids)
    with tempfile.TemporaryDirectory() as path:
        hf_model = build_hf(args, path)
        jax_step, jax_lora = jax_step_fn(path, args, ids, mask)
        torch_step, torch_lora = torch_step_fn(hf_model, args, ids, mask)
    if jax_lora != torch_lora:
        raise RuntimeError(f"LoRA parameter counts differ: ours {jax_lora}, peft {torch_lora}")
    import time
    start = time.perf_counter()
    jax_step()
    compile_s = time.perf_counter() - start
    jax_ms = median_ms(time_steps(jax_step, warmup=args.warmup, steps=args.steps))
    torch_ms = median_ms(time_steps(torch_step, warmup=args.warmup, steps=args.steps))
    tokens = args.batch * args.seq
    config = {k: v for k, v in vars(args).items()}
    rows = [
        ("distill_jax (jit)", f"{jax_ms:.1f}", f"{tokens / jax_ms * 1000:.0f}", f"{compile_s:.1f}"),
        ("HF + peft (eager)", f"{torch_ms:.1f}", f"{tokens / torch_ms * 1000:.0f}", "-"),
    ]
    print(f"LoRA step ({args.loss} loss, our remat {args.remat}, attention {args.attention}): hidden {args.hidden}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq} tokens, "
          f"rank {args.rank} ({jax_lora:,} LoRA parameters)")
    print_table(rows, ("implementation", "median step ms", "tokens/s", "first call s"))
    print(f"speed-up (HF + peft / ours): {torch_ms / jax_ms:.2f}x")
    if args.no_record:
        return
    append_result({"benchmark": "lora_step", "config": config, "machine": machine(),
                   "versions": versions("jax", "flax", "torch", "transformers", "peft"),
                   "ours_ms": jax_ms, "hf_peft_ms": torch_ms, "ratio": torch_ms / jax_ms,
                   "compile_s": compile_s})


if __name__ == "__main__":
    main()
