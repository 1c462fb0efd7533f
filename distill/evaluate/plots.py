"""The evaluation report's PNG plots: one function per figure, each drawing from report.json's numbers (and the
per-request details) or returning None when the report has nothing for it."""

from __future__ import annotations

import os
from typing import Any, Optional

from distill.evaluate.render import RUN_KEYS, fmt

COLORS = {"teacher": "#4c72b0", "student": "#dd8452", "base": "#8c8c8c"}


def make_plots(out_dir: str, report: dict[str, Any], details: dict[str, Any]) -> dict[str, str]:
    """Draw the PNG plots into out_dir (a local folder); returns {name: file name}."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the report is written by batch jobs and tests
    import matplotlib.pyplot as plt

    figures = {"loss_curves": loss_curves(plt, details), "learning_curve": learning_curve(plt, report),
               "selective": selective(plt, report), **confusions(plt, report),
               "latency_hist": latency_histogram(plt, report, details), "tokens": tokens(plt, report),
               "nll": nll_bars(plt, report)}
    plots: dict[str, str] = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=100)
        plt.close(fig)
        plots[name] = f"{name}.png"
    return plots


def loss_curves(plt, details: dict[str, Any]):
    """Training and validation loss against steps."""
    records = details.get("train_metrics") or []
    train_pts = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val_pts = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not (train_pts or val_pts):
        return None
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
    return fig


def learning_curve(plt, report: dict[str, Any]):
    """Held-out agreement while training (label tasks): against steps and against examples seen."""
    curve = [p for p in ((report.get("training") or {}).get("curve") or []) if p.get("val_agreement") is not None]
    if not curve:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "examples", "examples seen")):
        ax.plot([p[key] for p in curve], [p["val_agreement"] for p in curve], "o-", color=COLORS["student"])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation agreement with the teacher")
    axes[0].set_ylim(0, 1)
    fig.suptitle("Learning curve")
    return fig


def selective(plt, report: dict[str, Any]):
    """Coverage-agreement curves: held-out and selection rows, and the chosen threshold's point."""
    sel = report.get("selective")
    if not (sel and sel["heldout"]["curve"]):
        return None
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
    return fig


CONFUSION_AXES = {"student_vs_teacher": ("teacher", "distilled student"), "base_vs_teacher": ("teacher", "base student"),
                  "teacher_vs_gold": ("gold", "teacher"), "student_vs_gold": ("gold", "distilled student"),
                  "base_vs_gold": ("gold", "base student")}


def confusions(plt, report: dict[str, Any]) -> dict[str, Optional[Any]]:
    """One confusion matrix per comparison (label tasks): {confusion_<key>: figure}."""
    labels = report.get("labels")
    if not labels:
        return {}
    out = {}
    for key, cm in labels["confusion"].items():
        ref_name, pred_name = CONFUSION_AXES.get(key, ("reference", "predicted"))
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
        out[f"confusion_{key}"] = fig
    return out


def latency_histogram(plt, report: dict[str, Any], details: dict[str, Any]):
    """Per-request in-engine latency of each pass."""
    latency = details.get("latency") or {}
    if not any(latency.get(run) for run in RUN_KEYS):
        return None
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
    return fig


def tokens(plt, report: dict[str, Any]):
    """Mean prompt and output tokens per request of each pass."""
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
    return fig


def nll_bars(plt, report: dict[str, Any]):
    """Prompt absorption: the NLLs (a), (b), (c) of the teacher's answers and the gap closed."""
    nll = report["nll"]
    bars = [("(a) base, no prompt", nll["base_no_prompt"], COLORS["base"]),
            ("(b) base + prompt", nll["base_with_prompt"], COLORS["teacher"]),
            ("(c) distilled, no prompt", nll["student_no_prompt"], COLORS["student"])]
    bars = [b for b in bars if b[1] is not None]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, b in enumerate(bars):
        ax.text(b[1], i, f" {b[1]:.3f}", va="center", fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("mean NLL of the teacher's answers (nats / token)")
    ax.set_title(f"Prompt absorption: gap closed {fmt(nll['gap_closed'], '.2f')}")
    ax.margins(x=0.15)
    return fig
