"""Metric functions on small cases computed by hand (the arithmetic is in the comments), and the report assembly
(build_report -> write_report) on hand-made engine outputs: fast, no engines, no Ray."""

from __future__ import annotations

import json

import pytest

from distill import metrics as M


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


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


def test_agreement_counts_missing_answers_as_disagreement():
    # rows: a=a yes, b!=c no, None/None no (the teacher did not answer either), c=c yes -> 2/4
    assert M.agreement(["a", "b", None, "c"], ["a", "c", None, "c"]) == 0.5
    assert M.agreement([], []) is None
    with pytest.raises(ValueError):
        M.agreement(["a"], [])


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
def test_exact_match_normalizes_whitespace_only():
    assert M.exact_match("  Hello   world\n", "Hello world")
    assert not M.exact_match("hello world", "Hello world")      # case is part of the answer
    assert not M.exact_match(None, "x")
    assert not M.exact_match(None, None)


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


def test_text_similarity_means_over_rows():
    sim = M.text_similarity(["a b", "a"], ["a b", "b"])
    assert sim == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}


# ----------------------------------------------------------------------------------------------------------------
# Prompt absorption
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
# Cost
def test_request_cost():
    # 1000 prompt tokens at $0.10/M + 10 output tokens at $0.40/M = (100 + 4) / 1e6
    assert M.request_cost(1000, 10, 0.10, 0.40) == approx(1.04e-4)
    assert M.request_cost(None, 10, 1, 1) is None


def test_training_cost():
    assert M.training_cost(1800, 2.0, 4) == approx(4.0)         # half an hour x 4 workers x $2
    assert M.training_cost(3600, 2.0, 0) == approx(2.0)         # at least one worker
    assert M.training_cost(None, 2.0, 1) is None


def test_break_even_queries():
    assert M.break_even_queries(4.0, 0.001) == 4000
    assert M.break_even_queries(4.0, 0.003) == 1334              # 1333.33 rounded up
    assert M.break_even_queries(0.0, 0.1) == 0
    assert M.break_even_queries(4.0, 0.0) is None                 # saves nothing: never pays off
    assert M.break_even_queries(4.0, -1e-5) is None
    assert M.break_even_queries(None, 0.1) is None


# ----------------------------------------------------------------------------------------------------------------
# Report assembly on hand-made engine outputs
def _result(rid, text, prompt_tokens, output_tokens, latency):
    return {"id": rid, "generated_text": text, "num_input_tokens": prompt_tokens,
            "num_generated_tokens": output_tokens, "latency_s": latency, "queue_s": None, "ttft_s": latency / 2,
            "decode_s": None, "error": None}


def test_build_and_write_report_by_hand(tmp_path):
    from distill.report import REPORT_KEYS, write_report
    from distill.tasks import load_task
    from pipelines.evaluate import EvalConfig, Inputs, build_report

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
    cost = {"teacher": (1000, 10, 0.4), "student": (20, 4, 0.1), "base": (20, 8, 0.1)}
    results = {run: {r["id"]: _result(r["id"], text, *cost[run]) for r, text in zip(rows, outputs[run])}
               for run in outputs}
    inputs = Inputs(rows=rows, task=task, teacher="T", student="S", adapter="A", data="D", train="OUT",
                    summary={"wall_s": 3600.0, "workers": 2, "steps": 10}, train_metrics=[
                        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "val_loss": 1.7}])
    config = EvalConfig(train="OUT", output=str(tmp_path))
    nll = {"base_no_prompt": 3.0, "base_with_prompt": 1.0, "student_no_prompt": 1.5, "gap_closed": 0.75,
           "note": None, "answer_tokens": 20, "rows": 4, "prompt_context_tokens_mean": 900.0, "seconds": 1.0}
    nll_rows = {k: [1.0] * 4 for k in "abc"}
    report, details = build_report(config, inputs, results, {"teacher": 10.0, "student": 5.0, "base": 5.0},
                                   nll, nll_rows)
    report["seconds"] = 1.0

    # student vs teacher labels: en=en, fr=fr, None vs es, de vs en -> 2/4; base: fr/en, None, None, en=en -> 1/4
    assert report["fidelity"]["student"]["agreement"] == 0.5
    assert report["fidelity"]["base"]["agreement"] == 0.25
    # gold (q1, q2, q4): teacher en, fr, en(wrong) -> 2/3; student en, fr, de -> 3/3; base fr, None, en -> 0/3
    assert report["gold"] == {"rows": 3, "accuracy": {"teacher": approx(2 / 3), "student": 1.0, "base": 0.0}}
    assert report["runs"]["student"]["parse_rate"] == 0.75
    assert report["labels"]["confusion"]["student_vs_teacher"]["matrix"][task.answer.labels.index("en")][
        task.answer.labels.index("de")] == 1
    # cost: teacher (1000 * 0.10 + 10 * 0.40) / 1e6 = 1.04e-4; student (20 * 0.10 + 4 * 0.40) / 1e6 = 3.6e-6
    assert report["cost"]["per_request_usd"]["teacher"] == approx(1.04e-4)
    assert report["cost"]["per_request_usd"]["student"] == approx(3.6e-6)
    assert report["cost"]["savings_per_1k_queries_usd"] == approx(0.1004)
    # training: 1 h x 2 workers x $1 = $2; 2 / 1.004e-4 = 19920.3 -> 19921 queries
    assert report["cost"]["training_cost_usd"] == approx(2.0)
    assert report["cost"]["break_even_queries"] == 19921
    assert report["headline"]["speedup_p50"] == approx(4.0)     # 0.4 s / 0.1 s

    paths = write_report(str(tmp_path), report, details)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == set(REPORT_KEYS)
    assert set(saved["plots"]) == {"loss_curves", "latency_hist", "tokens", "nll", "confusion_student_vs_teacher",
                                   "confusion_base_vs_teacher", "confusion_teacher_vs_gold",
                                   "confusion_student_vs_gold", "confusion_base_vs_gold"}
    for name in saved["plots"].values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "report.html").read_text()
    for name in saved["plots"].values():
        assert f'src="{name}"' in page
    assert "50.0%" in (tmp_path / "report.md").read_text()
    assert paths["html"].endswith("report.html")


def test_free_text_report_has_similarity_and_no_label_sections(tmp_path):
    from distill.report import REPORT_KEYS, write_report
    from distill.tasks import load_task
    from pipelines.evaluate import EvalConfig, Inputs, build_report

    task = load_task("persona")
    rows = [{"id": "q1", "text": "How is your hearing?", "answer": "It fails me, Himmel!", "gold": None},
            {"id": "q2", "text": "Your best work?", "answer": "The Missa solemnis.", "gold": None}]
    outputs = {"teacher": ["It fails me, Himmel!", "The Missa solemnis."],
               "student": ["It fails me, Himmel!", "The Ninth, of course."],
               "base": ["I am an AI.", "x"]}
    results = {run: {r["id"]: _result(r["id"], t, 500 if run == "teacher" else 12, 9, 0.2) for r, t in
                     zip(rows, outputs[run])} for run in outputs}
    inputs = Inputs(rows=rows, task=task, teacher="T", student="S", adapter="A", data="D", train=None,
                    summary=None)
    nll = {"base_no_prompt": 2.0, "base_with_prompt": 2.0, "student_no_prompt": 1.0,
           **M.gap_closed(2.0, 2.0, 1.0), "answer_tokens": 12, "rows": 2, "prompt_context_tokens_mean": 400.0,
           "seconds": 1.0}
    nll["gap_closed"] = nll.pop("value")
    report, details = build_report(EvalConfig(data="D", output=str(tmp_path)), inputs, results,
                                   {"teacher": 1.0, "student": 1.0, "base": 1.0}, nll, {k: [1.0, 1.0] for k in "abc"})
    report["seconds"] = 1.0
    assert report["labels"] is None and report["gold"] is None
    assert report["fidelity"]["student"]["agreement"] is None
    # row 1 identical; row 2 "the ninth of course" vs "the missa solemnis": one shared word ("the"), 4 vs 3 words
    # -> token F1 2 * (1/4 * 1/3) / (1/4 + 1/3) = 2/7; ROUGE-L the same (LCS 1)
    assert report["fidelity"]["student"]["exact_match"] == 0.5
    assert report["fidelity"]["student"]["token_f1"] == approx((1 + 2 / 7) / 2)
    assert report["fidelity"]["student"]["rouge_l"] == approx((1 + 2 / 7) / 2)
    assert report["headline"]["gap_closed"] is None                 # a == b: nothing to absorb
    assert report["cost"]["break_even_queries"] is None and "no training summary" in report["cost"]["note"]
    write_report(str(tmp_path), report, details)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved) == set(REPORT_KEYS)
    assert set(saved["plots"]) == {"latency_hist", "tokens", "nll"}   # no training curves, no label matrices
    page = (tmp_path / "report.html").read_text()
    assert "No training metrics" in page and "undefined" in page
