"""Teacher labelling of 10 s clips: our batched letter scoring vs Hugging Face `generate`, clips/s.

Labelling a clip means getting the teacher's answer letter to a 10-way question. Ours is
`decoding.score_choices`: one jitted forward pass over the left-padded batch and the letter
logits at the last position. The HF way is what a PyTorch user runs: the processor's inputs
and `model.generate(max_new_tokens=N, do_sample=False)` under torch.no_grad (eager). N defaults
to 3: an Instruct model answers "A", then "." or "<|im_end|>", and a labeller has to let it
reach the end of its answer to parse it. A random model would stop at no eos or at a random
one, so `min_new_tokens=N` makes every clip run exactly N steps. A third row, HF's single
forward pass (letter logits at the last position), separates the gain from scoring instead of
generating from the rest.

--model=audio (Qwen2-Audio, default): HF gets the processor's 30 s padding (3000 mel frames,
which HF Qwen2-Audio requires); ours gets what the pipeline gives, the short window
(`audio.window_frames`: the real frames + 2, rounded up to 8; 1008 for 10 s), whose features
and embeddings equal the padded path's.
--model=visual (Qwen2-VL, the default direction's teacher): --frames frames of --frame-size
(2 fps), the same pixel values on both sides.

Both sides hold the same random model (built with transformers, saved, loaded by
`convert.load_hf`), float32. Inputs come from the repo's transforms (`Qwen2AudioTransform` on
random noise clips, 30 s for HF; `Qwen2VLTransform` on random frames) with 10-way
questions, prompts left-padded by `prompts.left_pad`. Before timing, HF's logits at the first
generated step (restricted to the letters) must equal ours (|diff| <= --tol = 1e-5 times their
largest magnitude), else the benchmark stops. Measured: under 1e-6 times it; a 1000-frame window
(no frames past the clip's end) was off by 4e-5 times it at the small size.

    python benchmarks/labelling.py                       # audio, batch 8 x 10 s clips, text 256 x 4 layers
    python benchmarks/labelling.py --batch=16 --hidden=512 --layers=8 --new-tokens=1
    python benchmarks/labelling.py --model=visual        # 20 frames of 252x448 per clip

Prints a table and appends a JSON line to benchmarks/results.jsonl (not with --no-record).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from common import (add_language_model_args, append_result, machine, median_ms, print_table,  # noqa: E402
                    time_steps, versions)
from data_pipelines import transforms  # noqa: E402
from data_pipelines.pipeline import PadBatch  # noqa: E402
from data_pipelines.audio import SAMPLE_RATE  # noqa: E402
from data_pipelines.questions import QuestionMaker  # noqa: E402
from distill_jax import prompts  # noqa: E402
from distill_jax.convert import load_hf  # noqa: E402
from distill_jax.decoding import score_choices  # noqa: E402
from distill_jax.toy_tokenizer import make_qwen2_tokenizer  # noqa: E402

# VGGSound-style class names the 10-way questions draw their options from.
CLASSES = [
    "dog barking", "cat meowing", "baby crying", "church bell ringing", "playing acoustic guitar",
    "playing piano", "car engine starting", "helicopter", "chainsaw", "lawn mowing", "rooster crowing",
    "cow lowing", "train horning", "thunder", "people clapping", "playing violin", "playing drum kit",
    "bird chirping", "male speech", "female singing",
]
FPS = 2.0  # frames per second of the clips (and the paper config's video_fps)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="audio", choices=["audio", "visual"])
    add_language_model_args(p)
    p.add_argument("--tower-dim", type=int, default=256, help="audio d_model / vision embed_dim")
    p.add_argument("--tower-layers", type=int, default=4)
    p.add_argument("--tower-heads", type=int, default=4)
    p.add_argument("--tower-ffn", type=int, default=1024, help="audio encoder_ffn_dim / vision mlp_ratio x embed_dim")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0, help="audio clip length")
    p.add_argument("--frames", type=int, default=20, help="video frames per clip (at 2 fps)")
    p.add_argument("--frame-size", default="252x448", help="video frame HxW")
    p.add_argument("--new-tokens", type=int, default=3, help="HF generate's max_new_tokens (= min_new_tokens)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--tol", type=float, default=1e-5, help="allowed letter-logit difference, times the largest |logit|")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results.jsonl")
    return p.parse_args()


def build_hf(args, path, tokenizer):
    """A random HF Qwen2-Audio or Qwen2-VL for `tokenizer`, saved at `path`."""
    import torch
    import transformers

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=max(args.vocab, len(tokenizer)), hidden_size=args.hidden,
                intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                num_key_value_heads=args.kv_heads, bos_token_id=None, eos_token_id=ids(prompts.IM_END),
                pad_token_id=tokenizer.pad_token_id, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if args.model == "audio":
        config = transformers.Qwen2AudioConfig(
            audio_config=dict(num_mel_bins=128, encoder_layers=args.tower_layers,
                              encoder_attention_heads=args.tower_heads, encoder_ffn_dim=args.tower_ffn,
                              d_model=args.tower_dim, max_source_positions=1500),
            text_config=text, audio_token_index=ids(prompts.AUDIO_TOKEN))
        cls = transformers.Qwen2AudioForConditionalGeneration
    else:
        half = args.hidden // args.heads // 2  # rotary half-dim, split over (t, h, w) as 7B's (16, 24, 24)
        text["rope_parameters"]["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
        config = transformers.Qwen2VLConfig(
            vision_config=dict(depth=args.tower_layers, embed_dim=args.tower_dim, hidden_size=args.hidden,
                               num_heads=args.tower_heads, mlp_ratio=args.tower_ffn // args.tower_dim),
            text_config=text, image_token_id=ids(prompts.IMAGE_TOKEN), video_token_id=ids(prompts.VIDEO_TOKEN),
            vision_start_token_id=ids(prompts.VISION_START), vision_end_token_id=ids(prompts.VISION_END))
        cls = transformers.Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # HF zero-inits biases and unit-inits norms; random ones make the check see them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def make_inputs(args, tokenizer_dir):
    """The repo's transform on random clips -> (our batch, HF's inputs as torch tensors, prompt
    lengths, a description of the media, media tokens per prompt)."""
    import torch

    rng = np.random.RandomState(0)
    maker = QuestionMaker(CLASSES, num_options=prompts.NUM_OPTIONS)
    examples = [{"clip_id": f"clip{i}", "options": maker(f"clip{i}", CLASSES[i % len(CLASSES)]).options}
                for i in range(args.batch)]
    if args.model == "audio":
        transform = transforms.Qwen2AudioTransform(tokenizer_dir, max_seconds=args.seconds)  # the pipeline's
        hf_transform = transforms.Qwen2AudioTransform(tokenizer_dir, max_seconds=30)  # the HF processor's padding
        for ex in examples:
            ex.update(audio=0.1 * rng.randn(int(args.seconds * SAMPLE_RATE)).astype(np.float32),
                      sample_rate=SAMPLE_RATE)
    else:
        transform = transforms.Qwen2VLTransform(tokenizer_dir)
        height, width = (int(x) for x in args.frame_size.split("x"))
        for ex in examples:
            ex.update(frames=rng.randint(0, 256, (args.frames, height, width, 3), dtype=np.uint8), fps=FPS)
    outs = [transform(ex) for ex in examples]
    lengths = [len(o["input_ids"]) for o in outs]
    # The pipeline's batching: prompts (and Qwen2-VL's M-RoPE positions) left-padded to the longest.
    batch = PadBatch(transform.padding((max(lengths),)))(outs)
    ids = batch["input_ids"]
    if args.model == "audio":
        ours = batch
        hf_outs = [hf_transform(ex) for ex in examples]
        hf = {k: torch.tensor(v) for k, v in batch.items()}
        for k in ("input_features", "feature_attention_mask"):
            hf[k] = torch.tensor(np.stack([o[k] for o in hf_outs]))
        media = (f"{args.seconds:g} s clips, mel frames: ours {batch['input_features'].shape[-1]}, "
                 f"HF {hf['input_features'].shape[-1]}")
        media_tokens = int(np.sum(ids[0] == transform.tokenizer.convert_tokens_to_ids(prompts.AUDIO_TOKEN)))
    else:
        ours = transforms.qwen2_vl_model_inputs(batch)
        video = transform.tokenizer.convert_tokens_to_ids(prompts.VIDEO_TOKEN)
        hf = {**{k: torch.tensor(v) for k, v in ours.items()}, "mm_token_type_ids": torch.tensor(2 * (ids == video))}
        media = f"{args.frames} frames of {args.frame_size}, grid {tuple(int(x) for x in batch['video_grid_thw'][0])}"
        media_tokens = int(np.sum(ids[0] == video))
    hf["input_ids"] = hf["input_ids"].long()
    return ours, hf, lengths, media, media_tokens


def main():
    args = parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        # Class names as single words, as the toy world does: prompts of ~100 text tokens, as Qwen2's tokenizer gives.
        tokenizer_dir = make_qwen2_tokenizer(os.path.join(tmp, "tokenizer"), words=CLASSES, vocab_size=1024)
        tokenizer = prompts.load_tokenizer(tokenizer_dir)
        hf = build_hf(args, os.path.join(tmp, "model"), tokenizer)
        model = load_hf(os.path.join(tmp, "model"))
        batch, hf_inputs, lengths, media, media_tokens = make_inputs(args, tokenizer_dir)
    letters = prompts.letter_token_ids(tokenizer)
    prompt_len = hf_inputs["input_ids"].shape[1]

    def ours():
        return np.asarray(score_choices(model, batch, letters))

    start = time.perf_counter()
    ours_logits = ours()
    compile_s = time.perf_counter() - start

    gen_kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                  eos_token_id=hf.config.text_config.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # HF's forward needs the positions of a left-padded batch (generate derives them; Qwen2-VL's
    # forward derives its M-RoPE positions from the attention mask itself).
    forward_kw = {}
    if args.model == "audio":
        forward_kw["position_ids"] = (hf_inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)

    def hf_generate(**kw):
        with torch.no_grad():
            return hf.generate(**hf_inputs, **gen_kw, **kw)

    def hf_forward():
        with torch.no_grad():
            return hf(**hf_inputs, **forward_kw).logits[:, -1, letters].numpy()

    out = hf_generate(output_logits=True, return_dict_in_generate=True)
    if out.sequences.shape[1] != prompt_len + args.new_tokens:
        raise RuntimeError(f"HF generated {out.sequences.shape[1] - prompt_len} tokens, expected {args.new_tokens}")
    ref = out.logits[0][:, letters].float().numpy()
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ours_logits - ref).max())
    forward_diff = float(np.abs(hf_forward() - ref).max())
    print(f"letter logits at the answer position: max |ours - HF generate step 1| = {diff:.2e}, "
          f"max |HF forward - HF generate step 1| = {forward_diff:.2e} (largest |logit| {scale:.3f})")
    if not diff <= args.tol * scale or not forward_diff <= args.tol * scale:
        raise RuntimeError(f"letter logits differ by {max(diff, forward_diff):.2e} > {args.tol * scale:.2e}")

    hf_media = "30 s" if args.model == "audio" else "video"
    rows, results = [], {}
    for name, step in ((f"distill_jax score_choices (jit{', short window' if args.model == 'audio' else ''})", ours),
                       (f"HF forward, letter logits (eager, {hf_media})", hf_forward),
                       (f"HF generate {args.new_tokens} tokens (eager, {hf_media})", lambda: hf_generate())):
        ms = median_ms(time_steps(step, warmup=args.warmup, steps=args.steps))
        results[name] = {"ms": ms, "clips_per_s": args.batch / ms * 1000}
        first = f"{compile_s:.1f}" if name.startswith("distill_jax") else "-"
        rows.append((name, args.batch, f"{args.batch / ms * 1000:.2f}", f"{ms:.0f}", first))
    ours_cps, fwd_cps, gen_cps = (r["clips_per_s"] for r in results.values())

    family = "Qwen2-Audio" if args.model == "audio" else "Qwen2-VL"
    print(f"{family} labelling: text hidden {args.hidden} x {args.layers} layers, tower {args.tower_dim} x "
          f"{args.tower_layers} layers; {media}; prompts {min(lengths)}-{max(lengths)} tokens "
          f"({media_tokens} media, {min(lengths) - media_tokens}-{max(lengths) - media_tokens} text); "
          f"torch threads {args.torch_threads}")
    print_table(rows, ("implementation", "batch", "clips/s", "median batch ms", "first call s"))
    print(f"speed-up (ours / HF generate clips/s): {ours_cps / gen_cps:.2f}x; "
          f"ours / HF forward: {ours_cps / fwd_cps:.2f}x")
    if not args.no_record:
        config = {k: v for k, v in vars(args).items() if k != "no_record"}
        append_result({"benchmark": "labelling", "config": {**config, "prompt_tokens": [min(lengths), max(lengths)],
                                                            "media": media},
                       "machine": machine(), "versions": versions("jax", "flax", "torch", "transformers"),
                       "ours_clips_per_s": ours_cps, "hf_clips_per_s": gen_cps, "ratio": ours_cps / gen_cps,
                       "hf_forward_clips_per_s": fwd_cps, "compile_s": compile_s, "max_abs_diff": diff})


if __name__ == "__main__":
    main()
