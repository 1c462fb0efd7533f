"""The evaluation report: report.json (stable keys, documented below), report.md (short, headline numbers),
report.html (a page a person reads in a browser, with the PNG plots beside it), and predictions.parquet.

Every key of report.json is listed in REPORT_KEYS with its meaning; a test holds the report to it. Numbers that are
undefined (a rate over nothing, gap closed when the prompt changes nothing) are null, never a made-up 0.
"""

from __future__ import annotations

import html
import json
import math
import os
from typing import Any, Optional

import pyarrow.parquet as pq

from distill.storage import is_local, join, resolve, write_json

RUN_KEYS = ("teacher", "student", "base")

REPORT_KEYS: dict[str, str] = {
    "schema_version": "Integer, bumped when a key changes meaning or disappears (new keys may be added).",
    "created": "Local time the report was written (ISO 8601).",
    "seconds": "Wall seconds of the whole evaluation (engines, NLL, report).",
    "task": "{name, type ('labels'|'free_text'), labels (label set or null), description}.",
    "inputs": "{data, train, split, rows, rows_with_gold, limit, teacher, student, adapter, student_constrained, "
              "student_serving ('merged' or 'lora': how the engine served the distilled student), engine {device, dtype, "
              "dtype_setting, cpu_kind, native_bf16, driver_cpu}: what the engines ran on and in}: "
              "what was evaluated. rows = held-out queries scored.",
    "headline": "{agreement, agreement_base, rouge_l, gold_accuracy {teacher, student, base} or null, gap_closed, "
                "speedup_p50, savings_per_1k_queries_usd, break_even_queries, student_parse_rate}: the numbers to "
                "read first (copies of values below).",
    "runs": "Per run ('teacher' = teacher + prompt, 'student' = distilled student without prompt, 'base' = base "
            "student without prompt): {title, model, adapter, prompt, requests, errors, parse_rate, "
            "prompt_tokens_mean, output_tokens_mean, latency_s {n, mean, p50, p95, max}, ttft_s {...}, wall_s}. "
            "wall_s: seconds of its engine run, start-up included; latency_s excludes start-up (see "
            "latency.definition).",
    "fidelity": "{student, base, teacher_vs_data}: each {agreement (label tasks: fraction of rows whose label equals "
                "the teacher's; an unparsed answer disagrees; null for free text), exact_match, token_f1, "
                "rouge_l (mean over rows, against the teacher's answer in this evaluation)}. teacher_vs_data compares "
                "the greedy teacher here with the answers in the data (sampled at generation).",
    "gold": "null unless a label task with gold labels: {rows (with gold), accuracy {teacher, student, base}}; an "
            "unparsed answer counts as wrong.",
    "labels": "null for free text; else {labels, per_label {student_vs_teacher, base_vs_teacher, and with gold "
              "teacher_vs_gold, student_vs_gold, base_vs_gold: {labels {label: {precision, recall, f1, support, "
              "predicted}}, macro {precision, recall, f1}}}, confusion {same pairs: {rows (reference labels), "
              "columns (predicted labels + '(none)' for unparsed), matrix, skipped}}}.",
    "nll": "{base_no_prompt (a), base_with_prompt (b), student_no_prompt (c), gap_closed = (a-c)/(a-b) or null, note, "
           "answer_tokens, rows, prompt_context_tokens_mean, seconds}: token-weighted mean NLL (nats per answer "
           "token) of the teacher's held-out answers.",
    "latency": "{definition (what latency_s measures), concurrency (requests in flight per engine), speedup_p50, "
               "speedup_p95 (teacher latency / distilled student latency)}.",
    "cost": "{prices {teacher, student: {input_per_million, output_per_million}, train_per_worker_hour}, "
            "per_request_usd {teacher, student}, savings_per_query_usd, savings_per_1k_queries_usd, "
            "training_wall_s, training_workers, training_cost_usd, break_even_queries (training cost / savings per "
            "query, rounded up; null if the student saves nothing), note}.",
    "training": "null without a training output; else train_summary.json's {complete, steps, final_loss, "
                "final_val_loss, best_val_loss, best_step, tokens_per_s, wall_s, workers, split}.",
    "plots": "{name: PNG file name beside report.html} for the plots drawn.",
    "config": "The EvalConfig the report was made with.",
}


# ----------------------------------------------------------------------------------------------------------------
# Formatting
def _num(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}"


def _pct(value: Optional[float]) -> str:
    return _num(value, ".1%")


def _usd(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"${value:.6f}" if abs(value) < 0.01 else f"${value:,.4f}"


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _sentence(note: str) -> str:
    """A note from the metrics ("the prompt changes ...") as a sentence of its own."""
    return note[:1].upper() + note[1:] + ("" if note.endswith(".") else ".")


# ----------------------------------------------------------------------------------------------------------------
# Plots
COLORS = {"teacher": "#4c72b0", "student": "#dd8452", "base": "#8c8c8c"}


def make_plots(out_dir: str, report: dict[str, Any], details: dict[str, Any]) -> dict[str, str]:
    """Draw the PNG plots into out_dir (a local folder); returns {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is written by batch jobs and tests
    import matplotlib.pyplot as plt

    plots: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100)
        plt.close(fig)
        plots[name] = f"{name}.png"

    # Training and validation loss curves.
    records = details.get("train_metrics") or []
    train_pts = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val_pts = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if train_pts or val_pts:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        if train_pts:
            ax.plot(*zip(*train_pts), label="training loss", color=COLORS["student"], linewidth=1.2)
        if val_pts:
            ax.plot(*zip(*val_pts), "o-", label="validation loss", color=COLORS["teacher"])
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / answer token)")
        ax.set_title("Training")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, "loss_curves")

    # Confusion matrices (label tasks).
    labels = report.get("labels")
    if labels:
        titles = {"student_vs_teacher": ("teacher", "distilled student"), "base_vs_teacher": ("teacher", "base student"),
                  "teacher_vs_gold": ("gold", "teacher"), "student_vs_gold": ("gold", "distilled student"),
                  "base_vs_gold": ("gold", "base student")}
        for key, cm in labels["confusion"].items():
            ref_name, pred_name = titles.get(key, ("reference", "predicted"))
            n_rows, n_cols = len(cm["rows"]), len(cm["columns"])
            # Small enough that two matrices sit side by side on the page.
            fig, ax = plt.subplots(figsize=(0.26 * n_cols + 1.9, 0.26 * n_rows + 1.5))
            ax.imshow(cm["matrix"], cmap="Blues", aspect="auto")
            ax.set_xticks(range(n_cols), cm["columns"], rotation=60, fontsize=8)
            ax.set_yticks(range(n_rows), cm["rows"], fontsize=8)
            peak = max((max(row) for row in cm["matrix"]), default=0) or 1
            for i, row in enumerate(cm["matrix"]):
                for j, count in enumerate(row):
                    if count:
                        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                                color="white" if count > peak / 2 else "black")
            ax.set_xlabel(f"{pred_name} label")
            ax.set_ylabel(f"{ref_name} label")
            ax.set_title(f"{pred_name} vs {ref_name}", fontsize=10)
            save(fig, f"confusion_{key}")

    # Per-request latency histograms.
    latency = details.get("latency") or {}
    if any(latency.get(run) for run in RUN_KEYS):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        values = [v for run in RUN_KEYS for v in latency.get(run, [])]
        lo, hi = min(values), max(values)
        bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
        for run in RUN_KEYS:
            if latency.get(run):
                ax.hist(latency[run], bins=bins, histtype="stepfilled", alpha=0.45, color=COLORS[run],
                        label=f"{report['runs'][run]['title']} (p50 {_num(report['runs'][run]['latency_s']['p50'])}s)")
        ax.set_xlabel("in-engine latency per request (s)")
        ax.set_ylabel("requests")
        ax.set_title("Latency per request")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "latency_hist")

    # Tokens per request.
    runs = report["runs"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = range(len(RUN_KEYS))
    prompt = [runs[r]["prompt_tokens_mean"] or 0 for r in RUN_KEYS]
    output = [runs[r]["output_tokens_mean"] or 0 for r in RUN_KEYS]
    ax.bar([i - 0.2 for i in x], prompt, width=0.4, label="prompt tokens", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], output, width=0.4, label="output tokens", color="#dd8452")
    for i, (p, o) in enumerate(zip(prompt, output)):
        ax.text(i - 0.2, p, f"{p:.0f}", ha="center", va="bottom", fontsize=8)
        ax.text(i + 0.2, o, f"{o:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [runs[r]["title"] for r in RUN_KEYS], fontsize=8)
    ax.set_ylabel("tokens per request (mean)")
    ax.set_title("Tokens per request")
    ax.legend(fontsize=8)
    save(fig, "tokens")

    # Prompt absorption: NLL (a), (b), (c).
    nll = report["nll"]
    bars = [("(a) base, no prompt", nll["base_no_prompt"], COLORS["base"]),
            ("(b) base + prompt", nll["base_with_prompt"], COLORS["teacher"]),
            ("(c) distilled, no prompt", nll["student_no_prompt"], COLORS["student"])]
    bars = [b for b in bars if b[1] is not None]
    if bars:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
        for i, b in enumerate(bars):
            ax.text(b[1], i, f" {b[1]:.3f}", va="center", fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel("mean NLL of the teacher's answers (nats / token)")
        ax.set_title(f"Prompt absorption: gap closed {_num(nll['gap_closed'], '.2f')}")
        ax.margins(x=0.15)
        save(fig, "nll")
    return plots


# ----------------------------------------------------------------------------------------------------------------
# Checks a reader wants answered first.
def checks(report: dict[str, Any]) -> list[tuple[bool, str]]:
    """(passed, sentence) facts behind 'should I ship it?'. They are observations, not thresholds to tune."""
    h, runs = report["headline"], report["runs"]
    out = []
    if h["agreement"] is not None and h["agreement_base"] is not None:
        out.append((h["agreement"] > h["agreement_base"],
                    f"The distilled student agrees with the teacher on {_pct(h['agreement'])} of held-out queries, "
                    f"the base student on {_pct(h['agreement_base'])}."))
    else:
        base = report["fidelity"]["base"]["rouge_l"]
        out.append(((h["rouge_l"] or 0) > (base or 0),
                    f"ROUGE-L against the teacher: distilled student {_num(h['rouge_l'])}, base student "
                    f"{_num(base)}."))
    if h["gap_closed"] is not None:
        # A gap closed with a note (the prompt barely moves the NLL, or moves it the wrong way) is not a pass.
        note = report["nll"].get("note")
        out.append((h["gap_closed"] > 0 and not note,
                    f"It absorbed {_num(h['gap_closed'], '.2f')} of the prompt's effect on the likelihood of the "
                    f"teacher's answers (gap closed; 1 = all of it)." + (f" {_sentence(note)}" if note else "")))
    else:
        out.append((False, f"Gap closed is n/a. {_sentence(report['nll']['note'] or 'NLL missing')}"))
    if h["gold_accuracy"]:
        g = h["gold_accuracy"]
        out.append(((g["student"] or 0) > (g["base"] or 0),
                    f"Gold accuracy: teacher {_pct(g['teacher'])}, distilled student {_pct(g['student'])}, "
                    f"base student {_pct(g['base'])}."))
    out.append(((h["student_parse_rate"] or 0) >= (runs["teacher"]["parse_rate"] or 0),
                f"Usable (parseable) answers: distilled student {_pct(h['student_parse_rate'])}, teacher "
                f"{_pct(runs['teacher']['parse_rate'])}."))
    savings = h["savings_per_1k_queries_usd"]
    out.append(((savings or 0) > 0,
                f"Per 1k queries it saves {_usd(savings)} at the configured prices; p50 latency "
                f"{_num(h['speedup_p50'], '.2f')}x faster; training pays for itself after "
                f"{h['break_even_queries'] if h['break_even_queries'] is not None else 'n/a'} queries."))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Markdown
def render_markdown(report: dict[str, Any]) -> str:
    h, runs, inputs = report["headline"], report["runs"], report["inputs"]
    lines = [
        f"# Distillation report: {report['task']['name']}",
        "",
        f"{inputs['rows']} held-out queries. Teacher `{inputs['teacher']}` with its prompt; distilled student "
        f"`{inputs['student']}` + `{inputs['adapter']}` and the base student, both without the prompt.",
        "",
        "| | value |", "|---|---|",
    ]
    if h["agreement"] is not None:
        lines.append(f"| agreement with teacher (distilled / base) | {_pct(h['agreement'])} / "
                     f"{_pct(h['agreement_base'])} |")
    lines.append(f"| ROUGE-L vs teacher (distilled / base) | {_num(h['rouge_l'])} / "
                 f"{_num(report['fidelity']['base']['rouge_l'])} |")
    if h["gold_accuracy"]:
        g = h["gold_accuracy"]
        lines.append(f"| gold accuracy (teacher / distilled / base) | {_pct(g['teacher'])} / {_pct(g['student'])} / "
                     f"{_pct(g['base'])} |")
    nll = report["nll"]
    lines += [
        f"| gap closed (NLL a / b / c) | {_num(h['gap_closed'], '.2f')} ({_num(nll['base_no_prompt'])} / "
        f"{_num(nll['base_with_prompt'])} / {_num(nll['student_no_prompt'])}) |",
        f"| student parse rate | {_pct(h['student_parse_rate'])} |",
        f"| prompt tokens per request (teacher / student) | {_num(runs['teacher']['prompt_tokens_mean'], '.0f')} / "
        f"{_num(runs['student']['prompt_tokens_mean'], '.0f')} |",
        f"| latency p50 / p95 (teacher) | {_num(runs['teacher']['latency_s']['p50'])}s / "
        f"{_num(runs['teacher']['latency_s']['p95'])}s |",
        f"| latency p50 / p95 (distilled) | {_num(runs['student']['latency_s']['p50'])}s / "
        f"{_num(runs['student']['latency_s']['p95'])}s |",
        f"| speedup (p50) | {_num(h['speedup_p50'], '.2f')}x |",
        f"| savings per 1k queries | {_usd(h['savings_per_1k_queries_usd'])} |",
        f"| break-even (queries) | {h['break_even_queries'] if h['break_even_queries'] is not None else 'n/a'} |",
        "",
    ]
    for ok, sentence in checks(report):
        lines.append(f"- {'✔' if ok else '✘'} {sentence}")
    if nll.get("note"):
        lines += ["", f"Note: {_sentence(nll['note'])}"]
    if report["cost"].get("note"):
        lines += ["", f"Note: {_sentence(report['cost']['note'])}"]
    lines += ["", "Full report: report.html (plots beside it), numbers: report.json, per query: predictions.parquet.",
              ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# HTML
CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1f2328; line-height: 1.45; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 36px; border-bottom: 1px solid #d0d7de;
padding-bottom: 4px; } .sub { color: #59636e; margin-top: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 18px 0; }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 14px; min-width: 150px; background: #f6f8fa; }
.card .v { font-size: 24px; font-weight: 600; } .card .k { font-size: 12px; color: #59636e; }
table { border-collapse: collapse; margin: 10px 0; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: right; vertical-align: top; }
th { background: #f6f8fa; } td.l, th.l { text-align: left; }
.checks li { list-style: none; margin: 3px 0; } .ok { color: #1a7f37; font-weight: 700; }
.bad { color: #cf222e; font-weight: 700; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.plots figure { margin: 0; } figcaption { font-size: 12px; color: #59636e; }
img { max-width: 100%; border: 1px solid #eaeef2; }
.missing { color: #cf222e; font-weight: 700; }
.note { color: #59636e; font-size: 13px; } .ex td { max-width: 320px; overflow-wrap: anywhere; text-align: left; }
"""


def _img(plots: dict[str, str], name: str, caption: str) -> str:
    if name not in plots:
        return ""
    src = _esc(plots[name])
    # data-loaded records the outcome in the page itself: the decoded width on load, "error" when the file is
    # missing or not an image; a broken plot also says so in red instead of leaving an empty frame.
    return (f'<figure><img src="{src}" alt="{_esc(caption)}" data-plot="{_esc(name)}" '
            f'onload="this.dataset.loaded=this.naturalWidth" '
            f'onerror="this.dataset.loaded=\'error\';this.insertAdjacentHTML(\'afterend\','
            f'\'<p class=missing>plot failed to load: {src}</p>\')">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _table(header: list[str], rows: list[list[Any]], left: int = 1, cls: str = "") -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_esc(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_esc(c)}</td>' for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def render_html(report: dict[str, Any], plots: dict[str, str], examples: list[dict]) -> str:
    h, runs, inputs, nll, cost = (report["headline"], report["runs"], report["inputs"], report["nll"],
                                  report["cost"])
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8>"
             f"<title>Distillation report: {_esc(report['task']['name'])}</title><style>{CSS}</style></head><body>"]
    parts.append(f"<h1>Distillation report: {_esc(report['task']['name'])}</h1>"
                 f"<p class=sub>{_esc(report['task']['description'])}<br>{inputs['rows']} held-out queries from "
                 f"<code>{_esc(inputs['data'])}</code> · teacher <code>{_esc(inputs['teacher'])}</code> · student "
                 f"<code>{_esc(inputs['student'])}</code> + adapter <code>{_esc(inputs['adapter'])}</code> (served "
                 f"{_esc(inputs.get('student_serving'))}) · engines {_esc(_engine_line(inputs.get('engine')))} · "
                 f"{_esc(report['created'])}</p>")

    cards = []
    if h["agreement"] is not None:
        cards.append(("agreement with teacher", _pct(h["agreement"]), f"base student {_pct(h['agreement_base'])}"))
    else:
        cards.append(("ROUGE-L vs teacher", _num(h["rouge_l"]),
                      f"base student {_num(report['fidelity']['base']['rouge_l'])}"))
    if h["gold_accuracy"]:
        g = h["gold_accuracy"]
        cards.append(("gold accuracy (distilled)", _pct(g["student"]),
                      f"teacher {_pct(g['teacher'])} · base {_pct(g['base'])}"))
    cards.append(("gap closed", _num(h["gap_closed"], ".2f"),
                  "unstable or undefined: see below" if nll.get("note") else "share of the prompt's effect absorbed"))
    cards.append(("speedup (p50 latency)", f"{_num(h['speedup_p50'], '.2f')}×",
                  f"{_num(runs['teacher']['latency_s']['p50'])}s → {_num(runs['student']['latency_s']['p50'])}s"))
    cards.append(("savings per 1k queries", _usd(h["savings_per_1k_queries_usd"]),
                  f"break-even after {h['break_even_queries'] if h['break_even_queries'] is not None else 'n/a'} "
                  f"queries"))
    parts.append('<div class=cards>' + "".join(
        f'<div class=card><div class=k>{_esc(k)}</div><div class=v>{_esc(v)}</div><div class=k>{_esc(s)}</div>'
        f'</div>' for k, v, s in cards) + "</div>")
    parts.append("<ul class=checks>" + "".join(
        f'<li><span class="{"ok" if ok else "bad"}">{"✔" if ok else "✘"}</span> {_esc(s)}</li>'
        for ok, s in checks(report)) + "</ul>")

    # Fidelity and accuracy.
    parts.append("<h2>Fidelity to the teacher</h2>")
    fid = report["fidelity"]
    gold = report["gold"]
    header = ["model", "parse rate", "agreement", "exact match", "token F1", "ROUGE-L"] + (
        ["gold accuracy"] if gold else [])
    rows = []
    for run in RUN_KEYS:
        f = fid.get(run) or {}
        row = [runs[run]["title"], _pct(runs[run]["parse_rate"]),
               _pct(f.get("agreement")) if run != "teacher" else "—",
               _pct(f.get("exact_match")) if run != "teacher" else "—",
               _num(f.get("token_f1")) if run != "teacher" else "—",
               _num(f.get("rouge_l")) if run != "teacher" else "—"]
        if gold:
            row.append(_pct(gold["accuracy"][run]))
        rows.append(row)
    parts.append(_table(header, rows))
    parts.append(f"<p class=note>Agreement, exact match, token F1 and ROUGE-L compare each student's answer with the "
                 f"teacher's answer to the same query in this evaluation (greedy). An answer that does not parse "
                 f"counts as a disagreement and, against gold ({gold['rows'] if gold else 0} rows with a gold "
                 f"label), as wrong. The greedy teacher matches the answers it gave at generation on "
                 f"{_pct(fid['teacher_vs_data']['agreement'] if fid['teacher_vs_data']['agreement'] is not None else fid['teacher_vs_data']['exact_match'])}"
                 f" of queries.</p>")

    # Prompt absorption.
    parts.append("<h2>Prompt absorption</h2>")
    parts.append(_table(["setting", "mean NLL (nats / answer token)"], [
        ["(a) base student, no prompt", _num(nll["base_no_prompt"], ".4f")],
        ["(b) base student, with the task prompt", _num(nll["base_with_prompt"], ".4f")],
        ["(c) distilled student, no prompt", _num(nll["student_no_prompt"], ".4f")],
        ["gap closed = (a − c) / (a − b)", _num(nll["gap_closed"], ".3f")],
    ]))
    parts.append(f"<p class=note>NLL of the teacher's held-out answers ({nll['answer_tokens']} answer tokens over "
                 f"{nll['rows']} queries), token-weighted. 0 = the student absorbed none of what the prompt does, "
                 f"1 = all of it, above 1 = it fits the teacher better than the prompted base student."
                 f"{' ' + _esc(_sentence(nll['note'])) if nll.get('note') else ''}</p>")
    parts.append('<div class=plots>' + _img(plots, "nll", "NLL under (a), (b), (c)") + "</div>")

    # Training.
    parts.append("<h2>Training</h2>")
    tr = report.get("training")
    if tr:
        parts.append(_table(["steps", "final loss", "final val loss", "best val loss (step)", "tokens/s", "wall",
                             "workers"],
                            [[tr.get("steps"), _num(tr.get("final_loss"), ".4f"),
                              _num(tr.get("final_val_loss"), ".4f"),
                              f"{_num(tr.get('best_val_loss'), '.4f')} ({tr.get('best_step')})",
                              _num(tr.get("tokens_per_s"), ".0f"), f"{_num(tr.get('wall_s'), '.1f')}s",
                              tr.get("workers")]], left=0))
    if "loss_curves" in plots:
        parts.append('<div class=plots>' + _img(plots, "loss_curves", "training and validation loss") + "</div>")
    else:
        parts.append("<p class=note>No training metrics (evaluate with --train OUT to see the loss curves).</p>")

    # Labels.
    labels = report.get("labels")
    if labels:
        parts.append("<h2>Labels</h2>")
        per = labels["per_label"]["student_vs_teacher"]
        gold_per = labels["per_label"].get("student_vs_gold")
        header = ["label", "support (teacher)", "precision", "recall", "F1"]
        if gold_per:
            header += ["support (gold)", "precision vs gold", "recall vs gold"]
        rows = []
        shown = [label for label in labels["labels"]
                 if per["labels"][label]["support"] or per["labels"][label]["predicted"]
                 or (gold_per and (gold_per["labels"][label]["support"] or gold_per["labels"][label]["predicted"]))]
        for label in shown:
            s = per["labels"][label]
            row = [label, s["support"], _num(s["precision"], ".2f"), _num(s["recall"], ".2f"), _num(s["f1"], ".2f")]
            if gold_per:
                g = gold_per["labels"][label]
                row += [g["support"], _num(g["precision"], ".2f"), _num(g["recall"], ".2f")]
            rows.append(row)
        m = per["macro"]
        rows.append(["macro", "", _num(m["precision"], ".2f"), _num(m["recall"], ".2f"), _num(m["f1"], ".2f")]
                    + (["", _num(gold_per["macro"]["precision"], ".2f"), _num(gold_per["macro"]["recall"], ".2f")]
                       if gold_per else []))
        parts.append(_table(header, rows))
        parts.append("<p class=note>Distilled student per label, with the teacher's label as the truth (and the gold "
                     "label where the data has one). n/a: the label was never predicted (precision) or never "
                     f"occurs (recall). Labels no model predicted and no reference holds are left out "
                     f"({len(labels['labels']) - len(shown)} of {len(labels['labels'])}).</p>")
        captions = {"student_vs_teacher": "distilled student vs teacher", "base_vs_teacher": "base student vs teacher",
                    "teacher_vs_gold": "teacher vs gold", "student_vs_gold": "distilled student vs gold",
                    "base_vs_gold": "base student vs gold"}
        parts.append('<div class=plots>' + "".join(_img(plots, f"confusion_{k}", f"confusion: {c}")
                                                   for k, c in captions.items()) + "</div>")

    # Latency, tokens, cost.
    parts.append("<h2>Latency and tokens</h2>")
    rows = []
    for run in RUN_KEYS:
        r = runs[run]
        rows.append([r["title"], r["requests"], r["errors"], _num(r["prompt_tokens_mean"], ".1f"),
                     _num(r["output_tokens_mean"], ".1f"), _num(r["latency_s"]["p50"]), _num(r["latency_s"]["p95"]),
                     _num(r["latency_s"]["mean"]), _num(r["ttft_s"]["p50"]), f"{_num(r['wall_s'], '.1f')}s"])
    parts.append(_table(["model", "requests", "errors", "prompt tokens", "output tokens", "latency p50 (s)",
                         "p95 (s)", "mean (s)", "first token p50 (s)", "run wall (incl. start-up)"], rows))
    lat = report["latency"]
    parts.append(f"<p class=note>{_esc(lat['definition'])} Concurrency: up to {lat['concurrency']} requests per "
                 f"engine. Speedup = teacher / distilled student: p50 {_num(lat['speedup_p50'], '.2f')}×, "
                 f"p95 {_num(lat['speedup_p95'], '.2f')}×.</p>")
    parts.append('<div class=plots>' + _img(plots, "latency_hist", "latency per request")
                 + _img(plots, "tokens", "tokens per request") + "</div>")

    parts.append("<h2>Cost</h2>")
    p = cost["prices"]
    parts.append(_table(["", "$ / 1M input tokens", "$ / 1M output tokens", "$ per request"], [
        ["teacher", p["teacher"]["input_per_million"], p["teacher"]["output_per_million"],
         _usd(cost["per_request_usd"]["teacher"])],
        ["distilled student", p["student"]["input_per_million"], p["student"]["output_per_million"],
         _usd(cost["per_request_usd"]["student"])],
    ]))
    parts.append(_table(["savings per query", "savings per 1k queries", "training cost", "break-even queries"], [[
        _usd(cost["savings_per_query_usd"]), _usd(cost["savings_per_1k_queries_usd"]),
        f"{_usd(cost['training_cost_usd'])} ({_num(cost['training_wall_s'], '.0f')}s × "
        f"{cost['training_workers'] or 'n/a'} worker(s) × ${p['train_per_worker_hour']}/h)",
        cost["break_even_queries"] if cost["break_even_queries"] is not None else "n/a"]], left=0))
    parts.append("<p class=note>Per-request cost uses the mean measured prompt and output tokens of each model. "
                 "Prices are configurable (EvalConfig.cost); the defaults are placeholders."
                 f"{' ' + _esc(_sentence(cost['note'])) if cost.get('note') else ''}</p>")

    if examples:
        parts.append("<h2>Examples</h2>")
        header = ["query", "teacher", "distilled student", "base student"] + (["gold"] if gold else [])
        rows = [[_short(e["text"]), _short(e["teacher_output"]), _short(e["student_output"]),
                 _short(e["base_output"])] + ([e["gold"]] if gold else []) for e in examples]
        parts.append(_table(header, rows, left=len(header), cls="ex"))
        parts.append("<p class=note>Raw outputs; every query with every model's answer, tokens and latency is in "
                     "predictions.parquet.</p>")
    parts.append("<p class=note>Numbers: report.json (keys documented in distill/report.py REPORT_KEYS).</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _engine_line(engine: Optional[dict]) -> str:
    if not engine:
        return "n/a"
    return f"{engine['dtype']} on {engine['device']} (CPU kind {engine['cpu_kind']})"


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
        return _write_report(out, path, None, report, details)
    work = tempfile.mkdtemp(prefix="distill-report-")
    try:
        return _write_report(out, work, (fs, path), report, details)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _write_report(out: str, work: str, remote, report: dict[str, Any], details: dict[str, Any]) -> dict[str, str]:
    """write_report's body: files go to the local folder `work`, then to `remote` (fs, path) if given."""
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
        fs, path = remote
        fs.create_dir(path, recursive=True)
        for name in os.listdir(work):
            with open(os.path.join(work, name), "rb") as src, fs.open_output_stream(f"{path}/{name}") as dst:
                dst.write(src.read())
    write_json(join(out, "report.json"), report)
    return {"json": join(out, "report.json"), "md": join(out, "report.md"), "html": join(out, "report.html"),
            "predictions": join(out, "predictions.parquet"), **{k: join(out, v) for k, v in plots.items()}}
