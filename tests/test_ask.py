"""distill_jax.ask (the Colab demo's engine): a clip read from an mp4 and scored through the study's
transform, bucket padding, mesh copies and jitted letter scorer gives the letter distribution of
the same model called directly on the unpadded prompt."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import media, toy_world
from distill_jax import ask, prompts
from distill_jax.convert import load_hf

CLASSES = [c.name for c in toy_world.CLASSES]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    return ask.example_clips(out, ("owl hooting", "playing cello"))


def test_read_clip_is_the_decoded_file(clips):
    path, _ = clips[0]
    clip = ask.read_clip(path, fps=4.0)
    pcm, jpegs = media.decode_clip(path, fps=4.0)
    np.testing.assert_array_equal(clip["audio"], pcm / 32768.0)
    np.testing.assert_array_equal(clip["frames"], np.stack([media.decode_jpeg(j) for j in jpegs]))
    assert clip["clip_id"] == "synthetic_0" and clip["sample_rate"] == 16000 and clip["fps"] == 4.0
    assert len(clip["audio"]) == 2 * 16000  # the toy clips are 2 s


def test_question_options_hold_the_true_class_at_the_answer():
    options, answer = ask.question_options("owl hooting", CLASSES, clip_id="c")
    assert len(options) == len(set(options)) == 10 and options[answer] == "owl hooting"
    assert ask.question_options("owl hooting", CLASSES, clip_id="c") == (options, answer)


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_letter_probabilities_equal_the_model_on_the_unpadded_prompt(modality, clips, tmp_path):
    model_dir = ask.random_checkpoint(modality, tmp_path, words=CLASSES, seed=3)
    read = [ask.read_clip(path) for path, _ in clips]
    options = [ask.question_options(label, CLASSES, clip_id=c["clip_id"])[0] for c, (_, label) in zip(read, clips)]
    got = ask.letter_probabilities(model_dir, modality, read, options)  # 8 devices: each clip repeated 8 times

    model = load_hf(model_dir)
    transform = ask._transform(modality, model_dir, ask.MAX_SECONDS, ask.VIDEO_FPS)
    letters = jnp.asarray(prompts.letter_token_ids(transform.tokenizer, prompts.LETTERS[:10]))
    for row, (clip, clip_options) in enumerate(zip(read, options)):
        example = transform({**clip, "options": clip_options})
        arrays = {k: jnp.asarray(v)[None] for k, v in example.items()}
        arrays["attention_mask"] = jnp.ones_like(arrays["input_ids"])
        static = transform.static_inputs({k: np.asarray(v) for k, v in arrays.items()})
        hidden = model.hidden_states(**transform.model_inputs(arrays, static))[:, -1]
        want = jax.nn.softmax(model.logits(hidden, letters)[0])
        np.testing.assert_allclose(got[row], want, atol=1e-5)
    assert not np.allclose(got[0], got[1], atol=1e-4)  # the clips differ, and so do the answers
