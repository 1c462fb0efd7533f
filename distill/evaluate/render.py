"""The evaluation report: report.json (stable keys, documented below), report.md (short), report.html (a page a
person reads in a browser, from the jinja2 template distill/evaluate/templates/report.html.j2, PNG plots beside it), and
predictions.parquet. The headline (its numbers and what they mean) is computed once, in `headline_items`, and
every format renders those items: the CLI lines, the markdown table and the HTML cards say the same thing.

Numbers that are undefined (a rate over nothing, gap closed when the prompt changes nothing) are null, never a
made-up 0.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import pyarrow.parquet as pq

from distill.storage import is_local, join, resolve, upload_dir, write_json

RUN_KEYS = ("teacher", "student", "base")

REPORT_KEYS: dict[str, str] = {
    "schema_version": "Integer, bumped when a key changes meaning or disappears (new keys may be added): 2.",
    "created": "Local time the report was written (ISO 8601).",
    "seconds": "Wall seconds of the evaluation, over every attempt.",
    "task": "{name, type ('labels'|'free_text'), labels (label set or null), description}.",
    "inputs": "{data, train, split ('test' by default: ids training neither learned from nor selected on), rows, "
              "rows_with_gold, limit, teacher, student, adapter, student_constrained, student_serving ('merged' or "
              "'lora'), engine {device, dtype, dtype_setting, cpu_kind, native_bf16, driver_cpu}}.",
    "headline": "{agreement, agreement_ci95 [low, high], kappa, agreement_base, majority_agreement (the floor), "
                "teacher_self_agreement (the ceiling), similarity, gold_accuracy {teacher, student, base} or null, "
                "gap_closed, speedup_p50, savings_per_1k_queries_usd, break_even_queries, student_parse_rate, "
                "ready_to_ship, selective_threshold, selective_coverage, selective_agreement, "
                "cascade_cost_per_1k_queries_usd, teacher_cost_per_1k_queries_usd}: the numbers to read first "
                "(copies of values below).",
    "verdict": "{ready (bool), text (the sentence the report leads with), reasons [why not], relative_to_ceiling "
               "(student agreement / teacher self-agreement)}: agreement judged against the serving threshold, the "
               "floor and the ceiling.",
    "runs": "Per run ('teacher' = teacher + prompt, 'student' = distilled student without prompt, 'base' = base "
            "student without prompt): {title, model, adapter, prompt, requests, errors, parse_rate, cut_by_length "
            "(answers that used their whole max_tokens), unfinished_reasoning (a thinking teacher's outputs whose "
            "reasoning never closed: no answer), prompt_tokens_mean, output_tokens_mean, latency_s {n, mean, p50, "
            "p95, max}, ttft_s {...}, wall_s} over the answer requests; wall_s is the whole engine pass, start-up "
            "and scoring requests included.",
    "fidelity": "{student, base: {agreement (judged rows only), agree, judged, unjudged (teacher answer "
                "unusable), agreement_ci95, kappa (labels), similarity (ROUGE-L F1 of the normalised answers)}, "
                "floor {kind: majority_label (labels: always answering the teacher's commonest label) or "
                "base_student (free text), label, rate, n}, ceiling {teacher_vs_sample, teacher_vs_data: same "
                "shape as student}, threshold (ship_agreement or ship_similarity)}.",
    "gold": "null unless a label task with gold labels: {rows (with gold), accuracy {teacher, student, base}}; an "
            "unparsed answer counts as wrong.",
    "labels": "null for free text; else {labels, per_label {student_vs_teacher, base_vs_teacher, and with gold "
              "teacher_vs_gold, student_vs_gold, base_vs_gold: {labels {label: {precision, recall, f1, support, "
              "predicted}}, macro {precision, recall, f1}}}, confusion {same pairs: {rows, columns (+ '(none)' for "
              "unparsed), matrix, skipped}}}.",
    "nll": "{base_no_prompt (a), base_with_prompt (b), student_no_prompt (c), gap_closed = (a-c)/(a-b) or null, note, "
           "answer_tokens, rows, rows_scored, prompt_context_tokens_mean, method}: token-weighted mean NLL (nats "
           "per answer token) of the teacher's held-out answers, scored on the engines.",
    "latency": "{definition (what latency_s measures), concurrency (requests in flight per engine), speedup_p50, "
               "speedup_p95 (teacher latency / distilled student latency)}.",
    "cost": "{prices, cached_prompt_tokens (the shared task prompt, priced as cached input), per_request_usd "
            "{teacher, student}, savings_per_query_usd, savings_per_1k_queries_usd, stage_seconds {generation, "
            "training, evaluation: over every attempt}, training_workers, distillation_usd {generation_usd, "
            "training_usd, evaluation_usd, total_usd}, break_even_queries (distillation cost / savings per query, "
            "rounded up; null if the student saves nothing), note}.",
    "training": "null without a training output; else train_summary.json's {complete, steps, planned_steps, "
                "stopped_early, final_loss, final_val_loss, final_val_agreement, best_val_loss, best_val_agreement, "
                "best_step, select_by, tokens_per_s, wall_s, attempts, workers, split, soft_labels, precision} and "
                "curve [{step, examples, val_agreement, val_loss}] (the learning curve).",
    "selective": "{target_agreement, threshold_chosen_on (where the threshold was chosen: the training run's "
                 "validation split, never the held-out rows), selection {rows, curve, area, at_threshold} or null, "
                 "threshold (the lowest confidence whose kept selection answers reach the target; null: none does), "
                 "no_threshold_reason, heldout {curve [{threshold, kept, coverage, agreement}], area}, at_threshold "
                 "{kept, judged, coverage, agreement, agreement_ci95} (the threshold applied to the held-out rows), "
                 "deferral_rate, cascade {deferral_rate, cost_per_1k_queries_usd {teacher_only, student_only, "
                 "cascade}, latency_p50_s {same}}, text}: the distilled student keeps a query when its confidence "
                 "(distill.evaluate.scores.confidence) reaches the threshold and defers it to the teacher otherwise.",
    "plots": "{name: PNG file name beside report.html} for the plots drawn.",
    "config": "The EvalConfig the report was made with.",
}


# ----------------------------------------------------------------------------------------------------------------
# Formatting: one number formatter for every format
def fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{suffix}"


def pct(value: Optional[float]) -> str:
    return fmt(value, ".1%")


def usd(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"${value:.6f}" if abs(value) < 0.01 else f"${value:,.4f}"


def interval(ci: Optional[list]) -> str:
    return "n/a" if not ci else f"{ci[0]:.1%}–{ci[1]:.1%}"


def sentence(note: str) -> str:
    """A note from the metrics ("the prompt changes ...") as a sentence of its own."""
    return note[:1].upper() + note[1:] + ("" if note.endswith(".") else ".")


def engine_line(engine: Optional[dict]) -> str:
    if not engine:
        return "n/a"
    return f"{engine['dtype']} on {engine['device']} (CPU kind {engine['cpu_kind']})"


# ----------------------------------------------------------------------------------------------------------------
# The headline, computed once
def headline_items(report: dict[str, Any]) -> list[dict]:
    """[{label, value, detail, ok (True / False / None: not a pass-or-fail number)}]: what the report leads with."""
    h, f, runs = report["headline"], report["fidelity"], report["runs"]
    items = []
    threshold = f["threshold"]
    if h["agreement"] is not None:
        items.append({"label": "agreement with teacher", "value": pct(h["agreement"]),
                      "detail": f"95% CI {interval(h['agreement_ci95'])}; needs {threshold:.0%} to ship",
                      "ok": h["agreement"] >= threshold})
        items.append({"label": "floor: always the commonest label", "value": pct(h["majority_agreement"]),
                      "detail": f"'{f['floor']['label']}'; student κ {fmt(h['kappa'], '.2f')}",
                      "ok": None if h["majority_agreement"] is None else h["agreement"] > h["majority_agreement"]})
        items.append({"label": "ceiling: teacher vs itself", "value": pct(h["teacher_self_agreement"]),
                      "detail": f"vs its training labels {pct(f['ceiling']['teacher_vs_data']['agreement'])}; "
                                f"base student {pct(h['agreement_base'])}", "ok": None})
    else:
        ceiling = f["ceiling"]["teacher_vs_sample"]["similarity"]
        items.append({"label": "ROUGE-L vs teacher", "value": fmt(h["similarity"]),
                      "detail": f"teacher vs itself {fmt(ceiling)}; base student {fmt(f['base']['similarity'])}",
                      "ok": report["verdict"]["ready"]})
    if h["gold_accuracy"]:
        g = h["gold_accuracy"]
        items.append({"label": "gold accuracy (distilled)", "value": pct(g["student"]),
                      "detail": f"teacher {pct(g['teacher'])} · base {pct(g['base'])}", "ok": None})
    note = report["nll"].get("note")
    items.append({"label": "gap closed", "value": fmt(h["gap_closed"], ".2f"),
                  "detail": "unstable or undefined: see below" if note else "share of the prompt's effect absorbed",
                  "ok": None if h["gap_closed"] is None else (h["gap_closed"] > 0 and not note)})
    items.append({"label": "speedup (p50 latency)", "value": fmt(h["speedup_p50"], ".2f", "×"),
                  "detail": f"{fmt(runs['teacher']['latency_s']['p50'])}s → {fmt(runs['student']['latency_s']['p50'])}s",
                  "ok": None if h["speedup_p50"] is None else h["speedup_p50"] > 1})
    sel = report.get("selective")
    if sel:
        at = sel["at_threshold"]
        c = sel["cascade"]["cost_per_1k_queries_usd"]
        items.append({"label": f"selective: kept at {sel['target_agreement']:.0%} target",
                      "value": pct(at["coverage"]) if sel["threshold"] is not None else "none",
                      "detail": (f"agreement {pct(at['agreement'])} ({interval(at['agreement_ci95'])}) on the kept "
                                 f"share; cascade {usd(c['cascade'])} vs teacher-only {usd(c['teacher_only'])} per 1k"
                                 if sel["threshold"] is not None else "no confidence threshold reaches the target"),
                      "ok": None if sel["threshold"] is None else bool(at["coverage"])})
    be = h["break_even_queries"]
    items.append({"label": "savings per 1k queries", "value": usd(h["savings_per_1k_queries_usd"]),
                  "detail": f"distillation pays for itself after {be if be is not None else 'n/a'} queries",
                  "ok": None if h["savings_per_1k_queries_usd"] is None else h["savings_per_1k_queries_usd"] > 0})
    return items


def headline_lines(report: dict[str, Any]) -> list[str]:
    """The headline as text lines (the CLI and `distill run` print these)."""
    return [report["verdict"]["text"]] + [f"{i['label']}: {i['value']} ({i['detail']})" for i in headline_items(report)]


# ----------------------------------------------------------------------------------------------------------------
# Markdown and HTML
def render_markdown(report: dict[str, Any]) -> str:
    inputs = report["inputs"]
    lines = [f"# Distillation report: {report['task']['name']}", "",
             f"{inputs['rows']} held-out queries ({inputs['split'] or 'all rows'}). Teacher `{inputs['teacher']}` with "
             f"its prompt; distilled student `{inputs['student']}` + `{inputs['adapter']}` and the base student, both "
             f"without the prompt. Engines: {engine_line(inputs.get('engine'))}.", "",
             f"**{'Ready to ship' if report['verdict']['ready'] else 'Not ready to ship'}.** {report['verdict']['text']}",
             "", "| | value | |", "|---|---|---|"]
    lines += [f"| {i['label']} | {i['value']} | {i['detail']} |" for i in headline_items(report)]
    nll = report["nll"]
    lines += ["", f"NLL of the teacher's answers (a / b / c): {fmt(nll['base_no_prompt'])} / "
                  f"{fmt(nll['base_with_prompt'])} / {fmt(nll['student_no_prompt'])}; gap closed "
                  f"{fmt(nll['gap_closed'], '.2f')}.", "", "Details: report.html; numbers: report.json."]
    return "\n".join(lines) + "\n"


def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["sentence"] = sentence
    return env.get_template("report.html.j2")


def render_html(report: dict[str, Any], plots: dict[str, str], examples: list[dict]) -> str:
    """The page: the template filled with table rows made here (numbers formatted once, by `fmt`)."""
    runs, f, nll, cost = report["runs"], report["fidelity"], report["nll"], report["cost"]
    is_labels = report["task"]["type"] == "labels"
    gold = report["gold"]

    def fid_row(title: str, x: dict, parse_rate: Optional[float] = None, gold_acc=None) -> list:
        row = [title, pct(parse_rate) if parse_rate is not None else "—"]
        row += [pct(x["agreement"]), interval(x["agreement_ci95"]), fmt(x["kappa"], ".2f"), x["judged"]] if is_labels \
            else [fmt(x["similarity"]), x["judged"]]
        row += [fmt(x["similarity"])] if is_labels else []
        return row + ([pct(gold_acc)] if gold else [])

    fidelity_header = ["model", "parse rate"] + (["agreement", "95% CI", "κ", "judged", "ROUGE-L"] if is_labels
                                                  else ["ROUGE-L vs teacher", "judged"]) + (["gold accuracy"] if gold else [])
    fidelity_rows = [fid_row(runs[r]["title"], f[r], runs[r]["parse_rate"], gold["accuracy"][r] if gold else None)
                     for r in ("student", "base")]
    fidelity_rows.append(fid_row("ceiling: teacher vs a second sample of itself", f["ceiling"]["teacher_vs_sample"],
                                 gold_acc=gold["accuracy"]["teacher"] if gold else None))
    fidelity_rows.append(fid_row("teacher vs its generation labels", f["ceiling"]["teacher_vs_data"]))
    floor = f["floor"]
    floor_text = (f"always answering the teacher's commonest label, '{floor['label']}', which agrees on "
                  f"{pct(floor['rate'])}" if floor["kind"] == "majority_label" else
                  f"the base student's similarity, {fmt(floor['rate'])}")

    per_label_rows, per_label_header, hidden, confusion = [], [], 0, []
    labels = report.get("labels")
    if labels:
        per = labels["per_label"]["student_vs_teacher"]
        gold_per = labels["per_label"].get("student_vs_gold")
        per_label_header = ["label", "support (teacher)", "precision", "recall", "F1"] + (
            ["support (gold)", "precision vs gold", "recall vs gold"] if gold_per else [])
        shown = [lb for lb in labels["labels"] if per["labels"][lb]["support"] or per["labels"][lb]["predicted"]
                 or (gold_per and (gold_per["labels"][lb]["support"] or gold_per["labels"][lb]["predicted"]))]
        hidden = len(labels["labels"]) - len(shown)
        for lb in shown:
            s = per["labels"][lb]
            row = [lb, s["support"], fmt(s["precision"], ".2f"), fmt(s["recall"], ".2f"), fmt(s["f1"], ".2f")]
            if gold_per:
                g = gold_per["labels"][lb]
                row += [g["support"], fmt(g["precision"], ".2f"), fmt(g["recall"], ".2f")]
            per_label_rows.append(row)
        m = per["macro"]
        per_label_rows.append(["macro", "", fmt(m["precision"], ".2f"), fmt(m["recall"], ".2f"), fmt(m["f1"], ".2f")]
                              + (["", fmt(gold_per["macro"]["precision"], ".2f"),
                                  fmt(gold_per["macro"]["recall"], ".2f")] if gold_per else []))
        confusion = list(CONFUSION_CAPTIONS.items())

    tr = report.get("training")
    training_header = ["steps", "final loss", "best (step)", "val agreement (best)", "tokens/s", "wall (all attempts)",
                       "workers", "soft labels"]
    training_rows = [[f"{tr.get('steps')}" + (" (stopped early)" if tr.get("stopped_early") else ""),
                      fmt(tr.get("final_loss"), ".4f"), f"{fmt(tr.get('best_val_loss'), '.4f')} ({tr.get('best_step')})",
                      pct(tr.get("best_val_agreement")), fmt(tr.get("tokens_per_s"), ".0f"),
                      f"{fmt(tr.get('wall_s'), '.1f')}s", tr.get("workers"), tr.get("soft_labels")]] if tr else []
    latency_rows = [[runs[r]["title"], runs[r]["requests"], runs[r]["errors"],
                     f"{runs[r]['cut_by_length']}" + (f" ({runs[r]['unfinished_reasoning']} unfinished reasoning)"
                                                       if runs[r]["unfinished_reasoning"] else ""),
                     fmt(runs[r]["prompt_tokens_mean"], ".1f"),
                     fmt(runs[r]["output_tokens_mean"], ".1f"), fmt(runs[r]["latency_s"]["p50"]),
                     fmt(runs[r]["latency_s"]["p95"]), fmt(runs[r]["ttft_s"]["p50"]), f"{fmt(runs[r]['wall_s'], '.1f')}s"]
                    for r in RUN_KEYS]
    p = cost["prices"]
    price_rows = [[who, p[key]["input_per_million"], p[key]["cached_input_per_million"] or
                   f"{p[key]['input_per_million'] / 4:g} (default)", p[key]["output_per_million"],
                   usd(cost["per_request_usd"][key])] for who, key in (("teacher", "teacher"),
                                                                      ("distilled student", "student"))]
    d = cost["distillation_usd"]
    cost_row = [usd(cost["savings_per_query_usd"]), usd(cost["savings_per_1k_queries_usd"]), usd(d["total_usd"]),
                cost["break_even_queries"] if cost["break_even_queries"] is not None else "n/a"]
    stage = cost["stage_seconds"]
    distillation_text = ", ".join(f"{k} {usd(d[k + '_usd'])} ({fmt(stage.get(k), '.0f')} s)"
                                  for k in ("generation", "training", "evaluation"))
    sel = report.get("selective")
    selective_rows = []
    if sel:
        c, lat = sel["cascade"]["cost_per_1k_queries_usd"], sel["cascade"]["latency_p50_s"]
        selective_rows = [[name, usd(c[key]), fmt(lat[key])] for name, key in (
            ("teacher only", "teacher_only"), ("student only", "student_only"),
            (f"cascade (defers {pct(sel['deferral_rate'])})", "cascade"))]
    example_header = ["query", "teacher", "distilled student", "confidence", "base student"] + (["gold"] if gold else [])
    example_rows = [[_short(e["text"]), _short(e["teacher_output"]), _short(e["student_output"]),
                     fmt(e.get("student_confidence"), ".2f"), _short(e["base_output"])]
                    + ([e["gold"]] if gold else []) for e in examples]
    return _template().render(
        r=report, plots=plots, items=headline_items(report), engine_line=engine_line(report["inputs"].get("engine")),
        fidelity_header=fidelity_header, fidelity_rows=fidelity_rows, floor_text=floor_text,
        per_label_header=per_label_header, per_label_rows=per_label_rows, labels_hidden=hidden,
        labels_total=len(labels["labels"]) if labels else 0, confusion_plots=confusion,
        nll_rows=[["(a) base student, no prompt", fmt(nll["base_no_prompt"], ".4f")],
                  ["(b) base student, with the task prompt", fmt(nll["base_with_prompt"], ".4f")],
                  ["(c) distilled student, no prompt", fmt(nll["student_no_prompt"], ".4f")],
                  ["gap closed = (a − c) / (a − b)", fmt(nll["gap_closed"], ".3f")]],
        training_header=training_header, training_rows=training_rows,
        latency_header=["model", "requests", "errors", "cut by length", "prompt tokens", "output tokens",
                        "latency p50 (s)", "p95 (s)",
                        "first token p50 (s)", "engine pass (incl. start-up)"], latency_rows=latency_rows,
        speedup_p50=fmt(report["latency"]["speedup_p50"], ".2f", "×"),
        speedup_p95=fmt(report["latency"]["speedup_p95"], ".2f", "×"),
        price_rows=price_rows, cost_row=cost_row, distillation_text=distillation_text,
        selective=sel, selective_rows=selective_rows,
        example_header=example_header, examples=example_rows)


CONFUSION_CAPTIONS = {"student_vs_teacher": "distilled student vs teacher", "base_vs_teacher": "base student vs teacher",
                      "teacher_vs_gold": "teacher vs gold", "student_vs_gold": "distilled student vs gold",
                      "base_vs_gold": "base student vs gold"}


def _short(text: Optional[str], n: int = 220) -> str:
    if text and not text.strip():
        return f"(only whitespace: {len(text)} chars)"  # an empty-looking cell would hide what the model did
    text = (text or "").strip()
    return text if len(text) <= n else text[:n - 1] + "…"


# ----------------------------------------------------------------------------------------------------------------
def write_report(out: str, report: dict[str, Any], details: dict[str, Any]) -> dict[str, str]:
    """Write plots, report.json, report.md, report.html and predictions.parquet into `out`; returns their paths.

    The plots are drawn locally; for a remote `out` (s3://...) they are uploaded beside the HTML."""
    import shutil
    import tempfile

    fs, path = resolve(out)
    if is_local(fs):
        return _write_report(out, path, False, report, details)
    work = tempfile.mkdtemp(prefix="distill-report-")
    try:
        return _write_report(out, work, True, report, details)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_report(out: str, work: str, remote: bool, report: dict[str, Any], details: dict[str, Any]) -> dict[str, str]:
    """write_report's body: files go to the local folder `work`, then (remote) are uploaded to `out`."""
    from distill.evaluate.plots import make_plots  # matplotlib only where a report is written

    os.makedirs(work, exist_ok=True)
    plots = make_plots(work, report, details)
    report["plots"] = plots
    missing = set(REPORT_KEYS) - set(report)
    if missing:
        raise ValueError(f"report lacks documented keys: {sorted(missing)}")
    predictions = details["predictions"]
    examples = predictions.slice(0, int(report["config"].get("examples", 20))).to_pylist()
    texts = {"report.md": render_markdown(report), "report.html": render_html(report, plots, examples)}
    for name, text in texts.items():
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(text)
    pq.write_table(predictions, os.path.join(work, "predictions.parquet"))
    if remote:
        upload_dir(work, out)
    write_json(join(out, "report.json"), report)
    return {"json": join(out, "report.json"), "md": join(out, "report.md"), "html": join(out, "report.html"),
            "predictions": join(out, "predictions.parquet"), **{k: join(out, v) for k, v in plots.items()}}
