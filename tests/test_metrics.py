"""Metric functions on small cases computed by hand (the arithmetic is in the comments), and the report assembly
(build_report -> write_report) on hand-made engine outputs: fast, no engines, no Ray."""

from __future__ import annotations

import json
import math

import pytest

from distill import metrics as M
from distill.evaluate.inputs import request_key
from distill.student_serving import StudentArtifact

# The distilled student as a CPU evaluation serves it: the adapter folded into the base.
MERGED = StudentArtifact("merged", "CPU", "base", {"task": "adapter"}, "adapter-merged", {})


def approx(x, abs: float = 1e-12):
    return pytest.approx(x, rel=1e-9, abs=abs)


# ----------------------------------------------------------------------------------------------------------------
# Summaries
def test_percentile_interpolates_linearly():
    assert M.percentile([4, 1, 3, 2], 50) == approx(2.5)        # sorted 1 2 3 4: halfway between 2 and 3
    assert M.percentile([1, 2, 3, 4], 95) == approx(3.85)       # position 3 * 0.95 = 2.85 -> 3 + 0.85 * (4 - 3)
    assert M.percentile([1, 2, 3, 4], 0) == 1
    assert M.percentile([1, 2, 3, 4], 100) == 4
    assert M.percentile([5.0], 95) == 5.0
    assert M.percentile([], 50) is None
    with pytest.raises(ValueError):
        M.percentile([1], 101)


def test_latency_summary_skips_failed_requests():
    s = M.latency_summary([0.1, None, 0.3])
    assert s["n"] == 2
    assert s["mean"] == approx(0.2)
    assert s["p50"] == approx(0.2)
    assert s["p95"] == approx(0.29)                             # 0.1 + 0.95 * (0.3 - 0.1)
    assert s["max"] == 0.3
    assert M.latency_summary([]) == {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}


def test_ratio_and_mean_are_undefined_on_nothing():
    assert M.ratio(1, 0) is None
    assert M.ratio(None, 2) is None
    assert M.ratio(3, 4) == 0.75
    assert M.mean([]) is None
    assert M.mean([1, 2, 6]) == 3


# ----------------------------------------------------------------------------------------------------------------
# Labels
def test_parse_rate():
    assert M.parse_rate([None, "x", "y", None]) == 0.5
    assert M.parse_rate([]) is None


def test_accuracy_uses_only_rows_with_gold_and_unparsed_is_wrong():
    # gold rows: (a, a) right, (None, a) wrong, (c, b) wrong; the 4th row has no gold -> 1/3
    assert M.accuracy(["a", None, "b", "c"], ["a", "a", None, "b"]) == {"accuracy": approx(1 / 3), "n": 3}
    assert M.accuracy(["a"], [None]) == {"accuracy": None, "n": 0}


def test_confusion_matrix_places_unparsed_and_unknown_in_none_column():
    cm = M.confusion_matrix(reference=["a", "a", "b", None, "b"], predicted=["a", "b", None, "a", "zz"],
                            labels=["a", "b"])
    assert cm["rows"] == ["a", "b"]
    assert cm["columns"] == ["a", "b", M.NONE_LABEL]
    assert cm["matrix"] == [[1, 1, 0],      # a -> a once, a -> b once
                            [0, 0, 2]]      # b -> unparsed, b -> "zz" (outside the label set)
    assert cm["skipped"] == 1               # the row with no reference label


def test_per_label_scores_by_hand():
    ref = ["a", "a", "b", "b", "b"]
    pred = ["a", "b", "b", None, "a"]
    s = M.per_label_scores(ref, pred, ["a", "b", "c"])
    a, b, c = s["labels"]["a"], s["labels"]["b"], s["labels"]["c"]
    # a: tp 1 (row 0); predicted a twice (rows 0, 4) -> P 1/2; support 2 -> R 1/2; F1 1/2
    assert (a["precision"], a["recall"], a["f1"], a["support"], a["predicted"]) == (0.5, 0.5, approx(0.5), 2, 2)
    # b: tp 1 (row 2); predicted b twice (rows 1, 2) -> P 1/2; support 3 -> R 1/3; F1 2*(1/6)/(5/6) = 0.4
    assert b["precision"] == 0.5 and b["recall"] == approx(1 / 3) and b["f1"] == approx(0.4)
    # c: never predicted, never present: undefined, not zero
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (None, None, None, 0)
    # macro over the defined labels only: P (0.5 + 0.5) / 2, R (0.5 + 1/3) / 2, F1 (0.5 + 0.4) / 2
    assert s["macro"] == {"precision": approx(0.5), "recall": approx(5 / 12), "f1": approx(0.45)}


def test_per_label_f1_is_zero_when_all_wrong():
    s = M.per_label_scores(["a", "b"], ["b", "a"], ["a", "b"])
    assert s["labels"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 1}


# ----------------------------------------------------------------------------------------------------------------
# Free text
def test_token_f1_by_hand():
    # pred {the, cat, sat}, ref {the, cat, ran, away}: overlap 2, P 2/3, R 1/2, F1 = (2/3) / (7/6) = 4/7
    assert M.token_f1("The cat sat.", "the cat ran away") == approx(4 / 7)
    # repeated tokens count once per match: overlap min(3, 1) = 1, P 1/3, R 1 -> F1 1/2
    assert M.token_f1("a a a", "a") == approx(0.5)
    assert M.token_f1("", "") == 1.0
    assert M.token_f1("", "x") == 0.0
    assert M.token_f1(None, "x") == 0.0
    assert M.token_f1("x y", "z") == 0.0


def test_lcs_and_rouge_l_by_hand():
    assert M.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4    # the textbook example (e.g. BCBA)
    assert M.lcs_length([], ["a"]) == 0
    # pred 6 words, ref 5 words, LCS "the cat on the mat" = 5: P 5/6, R 1 -> F1 (10/6) / (11/6) = 10/11
    assert M.rouge_l("the cat sat on the mat", "the cat on the mat") == approx(10 / 11)
    assert M.rouge_l("a b", "c d") == 0.0
    assert M.rouge_l(None, "a") == 0.0


def test_one_agreement_for_report_and_router():
    from distill.agreement import agreement_rate, compare, normalize
    from distill.tasks import load_task

    langid, persona = load_task("language-id"), load_task("persona")
    assert compare(langid, "Final Answer: en", "  Final Answer:   en ").agree is True
    assert compare(langid, "<think>hmm</think>Final Answer: fr", "Final Answer: fr").agree is True
    assert compare(langid, "Final Answer: en", "no idea").agree is False        # unparsed student disagrees
    assert compare(langid, "garbage", "Final Answer: en").agree is None         # unparsed teacher: unjudged
    assert normalize("Ahoy, matey!") == normalize("ahoy,   MATEY") == "ahoy, matey"
    same = compare(persona, "Ahoy, matey!", "ahoy,   MATEY")
    assert same.agree is True and same.similarity == 1.0
    paraphrase = compare(persona, "I am deaf, alas, and compose still.", "Alas, I am deaf yet I still compose.")
    assert paraphrase.agree is False and 0.3 < paraphrase.similarity < 1.0      # a paraphrase is similar, not equal
    assert compare(persona, "   ", "anything").agree is None
    rate = agreement_rate([compare(langid, "Final Answer: en", x) for x in ("Final Answer: en", "x")]
                          + [compare(langid, "?", "Final Answer: en")])
    assert rate == {"rate": 0.5, "agree": 1, "judged": 2, "unjudged": 1}


def test_mean_nll_is_token_weighted():
    assert M.mean_nll([10.0, 2.0], [4, 1]) == approx(2.4)       # 12 nats over 5 tokens, not mean(2.5, 2.0)
    assert M.mean_nll([], []) is None


def test_gap_closed_by_hand():
    assert M.gap_closed(3.0, 1.0, 2.0) == {"value": approx(0.5), "note": None}   # (3 - 2) / (3 - 1)
    assert M.gap_closed(3.0, 1.0, 1.0)["value"] == approx(1.0)
    assert M.gap_closed(3.0, 1.0, 3.0)["value"] == approx(0.0)
    assert M.gap_closed(3.0, 1.0, 0.5)["value"] == approx(1.25)                 # better than the prompt
    undefined = M.gap_closed(2.0, 2.0, 1.0)
    assert undefined["value"] is None and "a == b" in undefined["note"]
    inverted = M.gap_closed(1.0, 2.0, 1.5)                                       # (1 - 1.5) / (1 - 2)
    assert inverted["value"] == approx(0.5) and "a < b" in inverted["note"]
    assert M.gap_closed(None, 1.0, 1.0)["value"] is None
    # a - b = 0.1 is 1% of a = 10: still computed ((10 - 9.5) / 0.1 = 5), but flagged as unstable
    shaky = M.gap_closed(10.0, 9.9, 9.5)
    assert shaky["value"] == approx(5.0) and "unstable" in shaky["note"]


# ----------------------------------------------------------------------------------------------------------------
# Agreement against its floor and its uncertainty
def test_wilson_interval_by_hand():
    low, high = M.wilson_interval(2, 4)
    # p = 0.5, n = 4, z = 1.96: centre (0.5 + 0.4802) / 1.9604, half 1.96 * sqrt(0.0625 + 0.0601) / 1.9604
    assert low == approx(0.1500, abs=1e-4) and high == approx(0.8500, abs=1e-4)
    assert M.wilson_interval(0, 0) is None
    assert M.wilson_interval(48, 48)[1] == approx(1.0) and M.wilson_interval(48, 48)[0] == approx(0.9259, abs=1e-4)


def test_cohen_kappa_by_hand():
    # observed 2/4; predicted en, fr, (none), de; reference en, fr, es, en: expected (1*2 + 1*1) / 16 = 3/16
    assert M.cohen_kappa(["en", "fr", None, "de"], ["en", "fr", "es", "en"]) == approx((0.5 - 3 / 16) / (1 - 3 / 16))
    assert M.cohen_kappa(["ru"] * 4, ["ru", "ru", "en", "fr"]) == approx(0.0)  # always the commonest: no skill
    assert M.cohen_kappa(["a"], ["a"]) is None                                 # both constant: undefined
    assert M.cohen_kappa([], []) is None


def test_majority_agreement_is_the_floor():
    assert M.majority_agreement(["ru", "ru", "en", None, "ru"]) == {"label": "ru", "rate": 0.75, "n": 4}
    assert M.majority_agreement([None]) == {"label": None, "rate": None, "n": 0}


# ----------------------------------------------------------------------------------------------------------------
# Cost
def test_request_cost_prices_the_cached_prompt_apart():
    from distill.cost import Price, request_cost

    price = Price(input_per_million=0.10, output_per_million=0.40)
    # 1000 prompt tokens of which 800 cached (a quarter price by default), 10 output tokens
    assert request_cost(price, 1000, 800, 10) == approx((200 * 0.10 + 800 * 0.025 + 10 * 0.40) / 1e6)
    assert request_cost(Price(input_per_million=1, cached_input_per_million=0, output_per_million=0), 10, 4, 0) \
        == approx(6e-6)
    assert request_cost(price, None, 0, 10) is None


def test_break_even_queries():
    from distill.cost import break_even_queries

    assert break_even_queries(4.0, 0.001) == 4000
    assert break_even_queries(4.0, 0.003) == 1334              # 1333.33 rounded up
    assert break_even_queries(0.0, 0.1) == 0
    assert break_even_queries(4.0, 0.0) is None                 # saves nothing: never pays off
    assert break_even_queries(4.0, -1e-5) is None
    assert break_even_queries(None, 0.1) is None


# ----------------------------------------------------------------------------------------------------------------
# Report assembly on hand-made engine outputs
def _result(text, prompt_tokens, output_tokens, latency, logprobs=None):
    return {"generated_text": text, "generated_tokens": [1] * output_tokens, "token_logprobs": logprobs,
            "topk_ids": None, "topk_logprobs": None, "num_input_tokens": prompt_tokens,
            "num_generated_tokens": output_tokens, "latency_s": latency, "queue_s": None, "ttft_s": latency / 2,
            "decode_s": None, "error": None, "cut_by_length": False}


def _results(rows, outputs, samples, scores, tokens):
    """Engine results keyed like the requests of distill.evaluate.inputs.plan_requests (request_key: answer,
    sample, a, b, c)."""
    results = {run: {} for run in outputs}
    for i, r in enumerate(rows):
        for run in outputs:
            prompt, out, latency = tokens[run]
            results[run][request_key(r["id"], "answer")] = _result(outputs[run][i], prompt, out, latency, [-0.1] * out)
        results["teacher"][request_key(r["id"], "sample")] = _result(samples[i], tokens["teacher"][0], 5, 1.0)
        for kind, run in (("a", "base"), ("b", "base"), ("c", "student")):
            results[run][request_key(r["id"], kind)] = _result("", 10, 2, 0.05, scores[kind])
    return results


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_build_and_write_report_by_hand(tmp_path, tokenizer):
    from distill.evaluate.scores import shared_prefix_tokens
    from distill.evaluate.render import REPORT_KEYS, headline_lines, write_report
    from distill.tasks import load_task
    from distill.evaluate.inputs import EnginePass, Inputs
    from distill.evaluate.sections import build_report
    from distill.evaluate.config import EvalConfig

    task = load_task("language-id")
    rows = [{"id": "q1", "text": "Hello there", "answer": "Final Answer: en", "gold": "en"},
            {"id": "q2", "text": "Bonjour", "answer": "Final Answer: fr", "gold": "fr"},
            {"id": "q3", "text": "Hola", "answer": "Final Answer: es", "gold": None},
            {"id": "q4", "text": "Hallo", "answer": "Final Answer: de", "gold": "de"}]
    outputs = {
        "teacher": ["Final Answer: en", "Final Answer: fr", "Final Answer: es", "Final Answer: en"],
        "student": ["Final Answer: en", "Final Answer: fr", "no idea", "Final Answer: de"],
        "base": ["Final Answer: fr", "blah", "blah", "Final Answer: en"],
    }
    samples = ["Final Answer: en", "Final Answer: fr", "Final Answer: es", "Final Answer: fr"]
    # Per row two answer tokens: NLL a = 3, b = 1, c = 1.5 nats per token -> gap closed (3 - 1.5) / (3 - 1) = 0.75
    scores = {"a": [-3.0, -3.0], "b": [-1.0, -1.0], "c": [-1.5, -1.5]}
    tokens = {"teacher": (2000, 10, 0.4), "student": (20, 4, 0.1), "base": (20, 8, 0.1)}
    results = _results(rows, outputs, samples, scores, tokens)
    inputs = Inputs(rows=rows, task=task, teacher="T", student="S", adapter="A", data="D", train="OUT",
                    summary={"wall_s": 3600.0, "workers": 2, "steps": 10}, manifest=None, train_metrics=[
                        {"step": 1, "loss": 2.0, "examples": 8},
                        {"step": 2, "loss": 1.5, "val_loss": 1.7, "val_agreement": 0.25, "examples": 16}])
    # Two validation rows choose the selective threshold: a confident agreeing answer (p = e^-0.04) and an unsure
    # disagreeing one (e^-2); at target 0.9 the threshold is e^-0.04, which keeps none of the held-out answers
    # (each p = e^-0.4) although, graded on themselves, a threshold at e^-0.4 would keep all four.
    inputs.selection_rows = [{"id": "s1", "text": "Good day", "answer": "Final Answer: en", "gold": None},
                             {"id": "s2", "text": "Salut", "answer": "Final Answer: fr", "gold": None}]
    for sid, teacher_out, student_out, lp in (("s1", "Final Answer: en", "Final Answer: en", -0.01),
                                              ("s2", "Final Answer: fr", "Final Answer: de", -0.5)):
        results["teacher"][request_key(sid, "answer")] = _result(teacher_out, 2000, 10, 0.4, [-0.1] * 10)
        results["student"][request_key(sid, "answer")] = _result(student_out, 20, 4, 0.1, [lp] * 4)
    config = EvalConfig(train="OUT", output=str(tmp_path))
    passes = {run: EnginePass(results[run], wall) for run, wall in (("teacher", 10.0), ("student", 5.0), ("base", 5.0))}
    report, details = build_report(config, inputs, passes, {"context_lengths": [900] * 4}, MERGED, tokenizer,
                                   seconds=36.0)
    sel = report["selective"]
    assert sel["target_agreement"] == 0.9 and sel["threshold"] == approx(math.exp(-0.04))
    assert sel["selection"]["rows"] == 2 and sel["heldout"]["curve"] == [
        {"threshold": approx(math.exp(-0.4)), "kept": 4, "coverage": 1.0, "agreement": 0.5}]
    assert sel["at_threshold"]["kept"] == 0 and sel["deferral_rate"] == 1.0

    f = report["fidelity"]
    # student vs teacher labels: en=en, fr=fr, (none) vs es, de vs en -> 2 of 4 judged
    assert (f["student"]["agreement"], f["student"]["judged"], f["student"]["unjudged"]) == (0.5, 4, 0)
    assert f["student"]["agreement_ci95"] == approx(list(M.wilson_interval(2, 4)))
    assert f["student"]["kappa"] == approx((0.5 - 3 / 16) / (1 - 3 / 16))
    assert f["base"]["agreement"] == 0.25
    # floor: the teacher said en twice of 4; ceiling: its second sample agrees on 3 of 4, its data labels on 3 of 4
    assert f["floor"] == {"kind": "majority_label", "label": "en", "rate": 0.5, "n": 4}
    assert f["ceiling"]["teacher_vs_sample"]["agreement"] == 0.75
    assert f["ceiling"]["teacher_vs_data"]["agreement"] == 0.75
    verdict = report["verdict"]
    assert verdict["ready"] is False and verdict["text"].startswith("Not ready to ship")
    assert "no better than always answering 'en'" in verdict["reasons"]
    assert verdict["relative_to_ceiling"] == approx(0.5 / 0.75)
    # gold (q1, q2, q4): teacher en, fr, en(wrong) -> 2/3; student en, fr, de -> 3/3; base fr, None, en -> 0/3
    assert report["gold"] == {"rows": 3, "accuracy": {"teacher": approx(2 / 3), "student": 1.0, "base": 0.0}}
    assert report["runs"]["student"]["parse_rate"] == 0.75
    assert report["labels"]["confusion"]["student_vs_teacher"]["matrix"][task.answer.labels.index("en")][
        task.answer.labels.index("de")] == 1
    nll = report["nll"]
    assert (nll["base_no_prompt"], nll["base_with_prompt"], nll["student_no_prompt"]) == approx((3.0, 1.0, 1.5))
    assert nll["gap_closed"] == approx(0.75) and nll["rows_scored"] == 4
    # cost: the teacher's shared prompt is priced as cached input (a quarter of $0.10/M by default)
    cached = shared_prefix_tokens(tokenizer, task)
    assert 500 < cached < 2000
    teacher_cost = ((2000 - cached) * 0.10 + cached * 0.025 + 10 * 0.40) / 1e6
    assert report["cost"]["per_request_usd"]["teacher"] == approx(teacher_cost)
    assert report["cost"]["per_request_usd"]["student"] == approx((20 * 0.10 + 4 * 0.40) / 1e6)
    # distillation: training 1 h x 2 workers x $1 + evaluation 36 s x $1/h; generation unknown (said so)
    d = report["cost"]["distillation_usd"]
    assert d["training_usd"] == approx(2.0) and d["evaluation_usd"] == approx(0.01) and d["generation_usd"] is None
    assert "generation" in report["cost"]["note"]
    savings = teacher_cost - (20 * 0.10 + 4 * 0.40) / 1e6
    assert report["cost"]["break_even_queries"] == math.ceil(2.01 / savings * (1 - 1e-12))
    assert report["headline"]["speedup_p50"] == approx(4.0)     # 0.4 s / 0.1 s
    assert report["training"]["curve"] == [{"step": 2, "examples": 16, "val_agreement": 0.25, "val_loss": 1.7}]
    preds = details["predictions"].to_pylist()
    assert preds[0]["student_confidence"] == approx(math.exp(-0.4))  # 4 answer tokens at logprob -0.1

    paths = write_report(str(tmp_path), report, details)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == set(REPORT_KEYS)
    assert set(saved["plots"]) == {"loss_curves", "learning_curve", "latency_hist", "tokens", "nll", "selective",
                                   "confusion_student_vs_teacher", "confusion_base_vs_teacher",
                                   "confusion_teacher_vs_gold", "confusion_student_vs_gold", "confusion_base_vs_gold"}
    for name in saved["plots"].values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    for name in saved["plots"].values():
        assert f'src="{name}"' in page
    # Every format leads with the same verdict and the same headline items.
    md = (tmp_path / "report.md").read_text()
    for text in (md, page, "\n".join(headline_lines(saved))):
        assert "Not ready to ship" in text and "50.0%" in text and "75.0%" in text
    assert "✔" not in page
    assert paths["html"].endswith("report.html")


def test_free_text_report_has_similarity_and_no_label_sections(tmp_path, tokenizer):
    from distill.evaluate.render import REPORT_KEYS, write_report
    from distill.tasks import load_task
    from distill.evaluate.inputs import EnginePass, Inputs
    from distill.evaluate.sections import build_report
    from distill.evaluate.config import EvalConfig

    task = load_task("persona")
    rows = [{"id": "q1", "text": "How is your hearing?", "answer": "It fails me, Himmel!", "gold": None},
            {"id": "q2", "text": "Your best work?", "answer": "The Missa solemnis.", "gold": None}]
    outputs = {"teacher": ["It fails me, Himmel!", "The Missa solemnis."],
               "student": ["It fails me, Himmel!", "The Ninth, of course."],
               "base": ["I am an AI.", "x"]}
    scores = {"a": [-2.0], "b": [-2.0], "c": [-1.0]}
    tokens = {"teacher": (500, 9, 0.2), "student": (12, 9, 0.2), "base": (12, 9, 0.2)}
    results = _results(rows, outputs, outputs["teacher"], scores, tokens)
    inputs = Inputs(rows=rows, task=task, teacher="T", student="S", adapter="A", data="D", train=None,
                    summary=None, manifest=None)
    passes = {run: EnginePass(results[run], 1.0) for run in ("teacher", "student", "base")}
    report, details = build_report(EvalConfig(data="D", output=str(tmp_path)), inputs, passes,
                                   {"context_lengths": [400, 400]}, MERGED, tokenizer, seconds=1.0)
    assert report["labels"] is None and report["gold"] is None
    assert report["headline"]["agreement"] is None and report["fidelity"]["student"]["kappa"] is None
    # row 1 identical; row 2 "the ninth, of course" vs "the missa solemnis": LCS 1 word of 4 and 3 -> 2/7
    assert report["fidelity"]["student"]["similarity"] == approx((1 + 2 / 7) / 2)
    assert report["fidelity"]["student"]["agreement"] == 0.5          # exact after normalisation: row 1
    assert report["fidelity"]["ceiling"]["teacher_vs_sample"]["similarity"] == approx(1.0)
    assert report["verdict"]["ready"] is False                         # 0.64 of the ceiling < 0.9
    assert report["headline"]["gap_closed"] is None                    # a == b: nothing to absorb
    # No training summary: the distillation cost leaves training and generation out, and says so.
    assert "generation, training" in report["cost"]["note"]
    write_report(str(tmp_path), report, details)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == set(REPORT_KEYS)
    assert set(saved["plots"]) == {"latency_hist", "tokens", "nll", "selective"}  # no training curves or label matrices
    page = (tmp_path / "report.html").read_text()
    assert "No training summary" in page and "undefined" in page
