"""Human responses (data_pipelines/humans.py) and the models-vs-humans analysis' statistics."""
import numpy as np
import pytest
from scipy import stats as scipy_stats

from data_pipelines import humans
from distill_jax.stages import analysis

CLASSES = ["dog", "cat", "car", "bell"]
TRUTH = {"c1": "dog", "c2": "cat", "c3": "car"}
OPTIONS = "dog|cat|car|bell"


def _write(tmp_path, lines, name="humans.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_responses_resolve_letters_and_names_count_unknown_clips_and_score_by_condition(tmp_path):
    path = _write(tmp_path, [
        "clip_id,condition,participant,answer,options",
        f"c1,audio,p1,A,{OPTIONS}",        # dog: right
        f"c1,audio,p2,cat,{OPTIONS}",      # wrong, by name
        f"c2,audio,p1,b,{OPTIONS}",        # cat: right (lower-case letter)
        f"c3,video,p1,C,{OPTIONS}",        # car: right
        f"c3,video,p2,D,{OPTIONS}",        # bell: wrong
        f"c3,video,p3,bell,{OPTIONS}",     # wrong
        f"zz,audio,p1,A,{OPTIONS}",        # a clip the run does not have
        f"zz,video,p1,A,{OPTIONS}",
    ])
    responses = humans.read_responses(path, TRUTH, CLASSES)
    assert responses.unknown_clips == {"zz": 2} and responses.num_unknown == 2 and len(responses.rows) == 6
    acc = humans.accuracy_by_condition(responses)
    assert acc["audio"]["overall"] == pytest.approx(2 / 3) and acc["audio"]["participants"] == 2
    assert acc["audio"]["per_class"]["dog"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert acc["video"]["overall"] == pytest.approx(1 / 3) and acc["video"]["clips"] == 1
    assert "audio_video" not in acc
    # majority per clip: c3 has car 1, bell 2 -> bell; c1 ties dog/cat -> the first name in order (cat)
    assert humans.majority_answers(responses, "video") == {"c3": "bell"}
    assert humans.majority_answers(responses, "audio") == {"c1": "cat", "c2": "cat"}


@pytest.mark.parametrize("line, match", [
    (f"c1,smell,p1,A,{OPTIONS}", r"line 2: condition 'smell' is not one of"),
    (f"c1,audio,p1,E,{OPTIONS}", r"line 2: answer 'E' is neither a letter of the 4 options nor one of them"),
    ("c1,audio,p1,A,dog|cat|horse", r"line 2: option\(s\) \['horse'\] are not classes of the run"),
    ("c1,audio,p1,A,dog", r"line 2: options 'dog' are not 2 or more distinct names"),
    (f"c1,audio,,A,{OPTIONS}", r"line 2: empty clip_id, participant or answer"),
    (f"c1,audio,p1,A,{OPTIONS},extra", r"line 2: expected 5 fields"),
    ("c2,audio,p1,A,dog|car", r"line 2: clip c2's class 'cat' is not among its options"),
])
def test_a_malformed_row_names_the_file_and_line(tmp_path, line, match):
    path = _write(tmp_path, ["clip_id,condition,participant,answer,options", line])
    with pytest.raises(humans.HumanResponseError, match=match) as error:
        humans.read_responses(path, TRUTH, CLASSES)
    assert path in str(error.value)


def test_a_file_without_the_columns_is_named(tmp_path):
    path = _write(tmp_path, ["clip,condition,who,answer,options"])
    with pytest.raises(humans.HumanResponseError, match=r"line 1: missing column\(s\) \['clip_id', 'participant'\]"):
        humans.read_responses(path, TRUTH, CLASSES)


def test_simulated_participants_answer_as_the_design_allows(tmp_path):
    design = [{"class": "dog", "audio_pair_bayes_accuracy": 1.0, "visual_pair_bayes_accuracy": 0.6,
               "audio_partner": None, "visual_partner": "cat"},
              {"class": "cat", "audio_pair_bayes_accuracy": 0.7, "visual_pair_bayes_accuracy": 1.0,
               "audio_partner": "dog", "visual_partner": None}]
    clips = [(f"d{i}", "dog", ("dog", "cat", "car")) for i in range(50)] + \
            [(f"k{i}", "cat", ("car", "cat", "dog")) for i in range(50)]
    path = tmp_path / "sim.csv"
    path.write_text(humans.simulate(clips, design, participants=20, skill_sd=0.0, lapse=0.0, seed=3))
    truth = {c: t for c, t, _ in clips}
    responses = humans.read_responses(path, truth, ["dog", "cat", "car"])
    acc = humans.accuracy_by_condition(responses)
    expected = {("audio", "dog"): 1.0, ("audio", "cat"): 0.7, ("video", "dog"): 0.6, ("video", "cat"): 1.0,
                ("audio_video", "dog"): 1.0, ("audio_video", "cat"): 1.0}
    for (condition, name), value in expected.items():
        assert acc[condition]["per_class"][name]["accuracy"] == pytest.approx(value, abs=0.03), (condition, name)
    wrong = [r for r in responses.rows if not r["correct"]]
    assert wrong and all(r["chosen"] == {"dog": "cat", "cat": "dog"}[r["truth"]] for r in wrong)  # the partners
    assert acc["audio"]["participants"] == 20 and path.read_text().splitlines()[0] == ",".join(humans.COLUMNS)


def test_kappa_and_gap_correlation_against_references():
    # Cohen's kappa by hand: 10 items, observed agreement 0.7, chance 0.5*0.6 + 0.5*0.4 = 0.5 -> 0.4
    a = ["x"] * 5 + ["y"] * 5
    b = ["x"] * 4 + ["y"] + ["x", "x"] + ["y"] * 3
    assert analysis.cohen_kappa(a, b) == pytest.approx(0.4)
    assert analysis.cohen_kappa(["x", "x"], ["x", "x"]) is None  # chance agreement 1: undefined
    rng = np.random.default_rng(0)
    x = rng.normal(size=16)
    y = 0.7 * x + rng.normal(scale=0.5, size=16)
    out = analysis.correlation(x, y)
    assert out["pearson"]["value"] == pytest.approx(scipy_stats.pearsonr(x, y)[0])
    assert out["spearman"]["value"] == pytest.approx(scipy_stats.spearmanr(x, y)[0])
    for name in ("pearson", "spearman"):
        lo, hi = out[name]["ci95"]
        assert lo < out[name]["value"] < hi and hi - lo < 0.8
    assert out["classes"] == 16 and analysis.correlation(np.zeros(5), y[:5])["pearson"]["value"] is None
