"""The evaluation's numbers, from engine results to report sections: fidelity against its floor and its ceiling,
labels, prompt absorption (NLLs), latency, the learning curve, and the verdict. Plain functions over plain data;
`pipelines/evaluate.py` runs the engines and distill.evaluate.sections calls them.

Fidelity for label tasks is judged three ways, because a bare agreement rate misleads on skewed labels:
- the floor: how often always answering the teacher's commonest label would agree (and Cohen's kappa, agreement
  corrected for chance);
- the ceiling: how often the teacher agrees with itself (greedy against a second sample at its own temperature,
  and against the labels it gave at generation);
- the serving threshold: the agreement below which a rollout rolls back (RolloutConfig.min_agreement).
The verdict says "not ready to ship" whenever the student misses the threshold, and why.
"""

from __future__ import annotations

from typing import Any, Optional

from distill import metrics as M
from distill.agreement import agreement_rate, compare, mean_similarity
from distill.chat import render
from distill.evaluate.render import fmt
from distill.tasks import TaskSpec

RUNS = ("teacher", "student", "base")  # report order: the teacher, the distilled student, the baseline
RUN_TITLES = {"teacher": "teacher + prompt", "student": "distilled student, no prompt",
              "base": "base student, no prompt"}


# ----------------------------------------------------------------------------------------------------------------
# Tokens to score
def answer_tokens(tokenizer, context: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(context ids as the engine sees them, the answer's ids through the end-of-turn token): what a model must
    produce to give `answer`. What the template adds after the end-of-turn token (a newline) is formatting and is
    not scored. The same rendering as training's (`distill.chat.render`)."""
    prompt_ids, answer_ids = render(tokenizer, context + [{"role": "assistant", "content": answer}])
    eos = tokenizer.eos_token_id
    if eos in answer_ids:
        answer_ids = answer_ids[:answer_ids.index(eos) + 1]
    return prompt_ids, answer_ids


def shared_prefix_tokens(tokenizer, task: TaskSpec) -> int:
    """Prompt tokens every teacher request shares (the task prompt up to the query): what the engine's prefix cache
    computes once and the cost model prices as cached input."""
    def ids(query: str) -> list[int]:
        text = tokenizer.apply_chat_template(task.teacher_messages(query), add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    a, b = ids("alpha beta"), ids("zulu yankee")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------------------
# Fidelity
def fidelity_of(task: TaskSpec, teacher: list[Optional[str]], model: list[Optional[str]]) -> dict[str, Any]:
    """How a model's outputs agree with the teacher's, row by row (distill.agreement): the agreement rate with its
    95 % interval and chance-corrected kappa (labels), and text similarity."""
    comparisons = [compare(task, t, m) for t, m in zip(teacher, model)]
    rate = agreement_rate(comparisons)
    out: dict[str, Any] = {
        "agreement": rate["rate"], "agree": rate["agree"], "judged": rate["judged"], "unjudged": rate["unjudged"],
        "agreement_ci95": M.wilson_interval(rate["agree"], rate["judged"]),
        "similarity": mean_similarity(comparisons),
    }
    if task.answer.type == "labels":
        judged = [c for c in comparisons if c.agree is not None]
        out["kappa"] = M.cohen_kappa([c.student for c in judged], [c.teacher for c in judged])
    else:
        out["kappa"] = None
    return out


def fidelity_section(task: TaskSpec, outputs: dict[str, list[Optional[str]]], data_answers: list[str],
                     teacher_samples: list[Optional[str]], threshold: float) -> dict[str, Any]:
    """outputs: the greedy outputs of each run. The student's and base's fidelity, the floor, the ceiling."""
    teacher = outputs["teacher"]
    section: dict[str, Any] = {run: fidelity_of(task, teacher, outputs[run]) for run in ("student", "base")}
    section["ceiling"] = {
        # How often the greedy teacher agrees with another sample of itself at its own temperature: what a student
        # that imitates the teacher's sampling perfectly would reach, give or take.
        "teacher_vs_sample": fidelity_of(task, teacher, teacher_samples),
        # ... and with the (sampled) answers it gave at generation, which the student was trained on.
        "teacher_vs_data": fidelity_of(task, teacher, data_answers),
    }
    if task.answer.type == "labels":
        labels = [task.label_of(task.parse(t or "").answer) for t in teacher]
        section["floor"] = {"kind": "majority_label", **M.majority_agreement(labels)}
    else:
        section["floor"] = {"kind": "base_student", "label": None, "rate": section["base"]["similarity"],
                            "n": section["base"]["judged"]}
    section["threshold"] = threshold
    return section


def verdict(task: TaskSpec, fidelity: dict[str, Any], gap_closed: Optional[float]) -> dict[str, Any]:
    """Ready to ship, or not and why: the student's agreement judged against the serving threshold (labels; for
    free text its similarity against the teacher's own), the floor and the ceiling."""
    student, floor, ceiling = fidelity["student"], fidelity["floor"], fidelity["ceiling"]["teacher_vs_sample"]
    threshold = fidelity["threshold"]
    reasons: list[str] = []
    if task.answer.type == "labels":
        value, ci = student["agreement"], student["agreement_ci95"]
        if value is None:
            return {"ready": False, "text": "No verdict: no held-out query had a teacher answer to compare with.",
                    "reasons": ["nothing judged"], "relative_to_ceiling": None}
        ready = value >= threshold
        ceiling_value = ceiling["agreement"]
        relative = value / ceiling_value if ceiling_value else None
        text = (f"{'Ready to ship' if ready else 'Not ready to ship'}: the student agrees with its teacher on "
                f"{value:.1%} of {student['judged']} held-out queries (95 % CI {ci[0]:.1%}–{ci[1]:.1%}), "
                f"{'at or above' if ready else 'below'} the rollout's rollback threshold of {threshold:.0%}.")
        if floor["rate"] is not None:
            text += (f" Always answering the teacher's commonest label ({floor['label']}) would agree on "
                     f"{floor['rate']:.1%}")
            kappa = student["kappa"]
            text += f"; chance-corrected agreement (Cohen's κ) is {kappa:.2f}." if kappa is not None else "."
            if value <= floor["rate"]:
                reasons.append(f"no better than always answering {floor['label']!r}")
        if ceiling_value is not None:
            text += (f" The teacher agrees with a second sample of itself on {ceiling_value:.1%} (the ceiling): the "
                     f"student reaches {relative:.0%} of it." if relative is not None else "")
        if not ready:
            reasons.append(f"agreement {value:.1%} < threshold {threshold:.0%}")
        if ci is not None and ci[0] < threshold <= ci[1]:
            reasons.append("the threshold lies inside the confidence interval: evaluate more queries")
    else:
        value, ceiling_value = student["similarity"], ceiling["similarity"]
        relative = value / ceiling_value if value is not None and ceiling_value else None
        ready = bool(relative is not None and relative >= threshold and (gap_closed or 0) > 0)
        text = (f"{'Ready to ship' if ready else 'Not ready to ship'}: the student's answers reach a ROUGE-L of "
                f"{fmt(value, '.3f')} against the teacher's; the teacher against a second sample of itself: "
                f"{fmt(ceiling_value, '.3f')} (the ceiling), so the student is at {fmt(relative, '.0%')} of it "
                f"(threshold {threshold:.0%}); the base student scores {fmt(floor['rate'], '.3f')}.")
        if not ready:
            reasons.append("similarity below the threshold share of the teacher's own consistency")
    return {"ready": ready, "text": text, "reasons": reasons, "relative_to_ceiling": relative}


# ----------------------------------------------------------------------------------------------------------------
# Prompt absorption
def nll_section(scores: dict[str, list[Optional[list[float]]]], prompt_context_tokens: list[int],
                rows: int) -> tuple[dict[str, Any], dict[str, list[Optional[float]]]]:
    """scores: {a, b, c: per row, the log-probabilities of the teacher's answer tokens (None: not scored)}. The
    token-weighted mean NLLs, gap closed, and the per-row NLLs for the predictions table."""
    per_row, means = {}, {}
    for key, rows_lps in scores.items():
        per_row[key] = [(-sum(lps) / len(lps)) if lps else None for lps in rows_lps]
        scored = [lps for lps in rows_lps if lps]
        means[key] = M.mean_nll([-sum(lps) for lps in scored], [len(lps) for lps in scored])
    gap = M.gap_closed(means["a"], means["b"], means["c"])
    counts = [len(lps) for lps in scores["a"] if lps]
    return {
        "base_no_prompt": means["a"], "base_with_prompt": means["b"], "student_no_prompt": means["c"],
        "gap_closed": gap["value"], "note": gap["note"], "answer_tokens": sum(counts), "rows": rows,
        "rows_scored": sum(all(scores[k][i] for k in scores) for i in range(rows)),
        "prompt_context_tokens_mean": M.mean(prompt_context_tokens),
        "method": "teacher-forced decoding on the evaluation's vLLM engines (distill.scoring), prefix-cached",
    }, per_row


# ----------------------------------------------------------------------------------------------------------------
# Training
def learning_curve(train_metrics: list[dict]) -> list[dict]:
    """The validation points of the training run: step, examples seen, validation agreement and loss."""
    return [{"step": m["step"], "examples": m.get("examples"), "val_agreement": m.get("val_agreement"),
             "val_loss": m.get("val_loss")} for m in train_metrics if m.get("val_loss") is not None]


# ----------------------------------------------------------------------------------------------------------------
# Selective answering
def agreement_scores(task: TaskSpec, teacher: list[Optional[str]], model: list[Optional[str]]) -> list[Optional[float]]:
    """Per row, how well the model's answer matches the teacher's (distill.agreement): 1/0 for label tasks, the
    similarity for free text; None where the teacher's answer is unusable."""
    comparisons = [compare(task, t, m) for t, m in zip(teacher, model)]
    if task.answer.type == "labels":
        return [None if c.agree is None else float(c.agree) for c in comparisons]
    return [c.similarity for c in comparisons]


def selective_section(target: float, held: dict[str, list], selection: Optional[dict[str, list]],
                      selection_source: str, cascade: dict[str, Any]) -> dict[str, Any]:
    """The report's selective section. held / selection: {confidence, score} per row of the held-out rows and of
    the rows the threshold is chosen on (None: there are none, so no threshold is chosen: choosing it on the
    held-out rows would grade the threshold on the rows that picked it). cascade: `selective.cascade_figures`'s
    inputs but the threshold."""
    from distill import selective as S

    held_curve = S.coverage_curve(held["confidence"], held["score"])
    section: dict[str, Any] = {"target_agreement": target, "threshold_chosen_on": selection_source,
                               "heldout": {"curve": held_curve, "area": S.curve_area(held_curve)}}
    if selection is None:
        threshold, why = None, (f"no rows to choose a threshold on ({selection_source}); the held-out rows are not "
                                f"used for it")
        section["selection"] = None
    else:
        curve = S.coverage_curve(selection["confidence"], selection["score"])
        threshold = S.choose_threshold(curve, target)
        why = None if threshold is not None else (
            f"no confidence threshold lets the kept answers reach {target:.0%} agreement on the "
            f"{len(selection['score'])} {selection_source} rows")
        section["selection"] = {"rows": len(selection["score"]), "curve": curve, "area": S.curve_area(curve),
                                "at_threshold": S.kept_at(selection["confidence"], selection["score"], threshold)}
    at = S.kept_at(held["confidence"], held["score"], threshold)
    figures = S.cascade_figures(held["confidence"], threshold, **cascade)
    section.update({"threshold": threshold, "no_threshold_reason": why, "at_threshold": at,
                    "deferral_rate": figures["deferral_rate"], "cascade": figures})
    if threshold is None:
        section["text"] = f"No threshold reaches the target: {why}. Serve the teacher, or distil a better student."
    else:
        ci = at["agreement_ci95"]
        section["text"] = (
            f"At confidence ≥ {threshold:.3g} (chosen on {selection_source} for {target:.0%} agreement) the student "
            f"keeps {fmt(at['coverage'], '.1%')} of {at['judged']} held-out queries and agrees with the teacher on "
            f"{fmt(at['agreement'], '.1%')} of those"
            + (f" (95 % CI {ci[0]:.1%}–{ci[1]:.1%})" if ci else "") + "; the rest go to the teacher.")
    return section
