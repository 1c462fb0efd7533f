"""The evaluation report: report.json (stable keys, documented below), report.md (short), report.html (a page a
person reads in a browser, from the jinja2 template distill/templates/report.html.j2, PNG plots beside it), and
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
            "student without prompt): {title, model, adapter, prompt, requests, errors, parse_rate, "
            "prompt_tokens_mean, output_tokens_mean, latency_s {n, mean, p50, p95, max}, ttft_s {...}, wall_s} over "
            "the answer requests; wall_s is the whole engine pass, start-up and scoring requests included.",
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
                 "(distill.evaluation.confidence) reaches the threshold and defers it to the teacher otherwise.",
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

    # Held-out agreement while training (label tasks): against steps and against examples seen.
    curve = [p for p in ((report.get("training") or {}).get("curve") or []) if p.get("val_agreement") is not None]
    if curve:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
        for ax, key, label in ((axes[0], "step", "step"), (axes[1], "examples", "examples seen")):
            ax.plot([p[key] for p in curve], [p["val_agreement"] for p in curve], "o-", color=COLORS["student"])
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("validation agreement with the teacher")
        axes[0].set_ylim(0, 1)
        fig.suptitle("Learning curve")
        save(fig, "learning_curve")

    # Coverage-agreement curves: held-out and selection rows, and the chosen threshold's point.
    sel = report.get("selective")
    if sel and sel["heldout"]["curve"]:
        fig, ax = plt.subplots(figsize=(7, 3.6))
        curves = [("held-out", sel["heldout"], COLORS["student"])]
        if sel.get("selection"):
            curves.append(("selection (threshold chosen here)", sel["selection"], COLORS["base"]))
        for name, part, color in curves:
            pts = part["curve"]
            ax.step([p["coverage"] for p in pts], [p["agreement"] for p in pts], where="post", color=color,
                    label=f"{name}, area {fmt(part['area'], '.3f')}")
        ax.axhline(sel["target_agreement"], color="#999", linestyle="--", linewidth=1, label="target")
        at = sel["at_threshold"]
        if sel["threshold"] is not None and at["agreement"] is not None:
            ax.plot([at["coverage"]], [at["agreement"]], "o", color=COLORS["teacher"],
                    label=f"threshold {sel['threshold']:.3g} on held-out")
        ax.set_xlabel("coverage (share of queries the student keeps)")
        ax.set_ylabel("agreement of the kept answers")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title("Selective answering")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, "selective")

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
                        label=f"{report['runs'][run]['title']} (p50 {fmt(report['runs'][run]['latency_s']['p50'])}s)")
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
        ax.set_title(f"Prompt absorption: gap closed {fmt(nll['gap_closed'], '.2f')}")
        ax.margins(x=0.15)
        save(fig, "nll")
    return plots


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
    latency_rows = [[runs[r]["title"], runs[r]["requests"], runs[r]["errors"], fmt(runs[r]["prompt_tokens_mean"], ".1f"),
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
        latency_header=["model", "requests", "errors", "prompt tokens", "output tokens", "latency p50 (s)", "p95 (s)",
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
