"""Evaluation end to end: real generation, a real LoRA adapter, real Ray Data x vLLM engines for the teacher and
both students, transformers NLL, the full report, and the HTML rendered by headless Chromium.

Training is its own stage (pipelines/train.py); these tests do not depend on it. They build a training output
that follows its contract (adapter/, metrics.jsonl, split.parquet, train_summary.json) with a few real peft steps.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill.storage import read_columns

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


# ----------------------------------------------------------------------------------------------------------------
# A training output that follows the train stage's contract.
def make_training_output(gen_dir: str, model_dir: str, out: str, steps: int = 30, seed: int = 0) -> dict:
    """Train a real LoRA adapter on the generation output for a few steps and write OUT the way training does.

    Every third id (sorted) is the test split the evaluation scores, the next a validation split; the losses in
    metrics.jsonl are the real ones.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    rows = read_columns(f"{gen_dir}/data", ["id", "text", "answer"]).to_pylist()
    rows.sort(key=lambda r: r["id"])
    split = {r["id"]: ("test" if i % 3 == 0 else "validation" if i % 6 == 1 else "train") for i, r in enumerate(rows)}
    pq.write_table(pa.table({"id": list(split), "split": list(split.values())}), out_path / "split.parquet")

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))

    def encode(batch):
        ids, labels = [], []
        for r in batch:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": r["text"]}],
                                                   add_generation_prompt=True, tokenize=False)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(r["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            ids.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        return (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
                torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
                torch.tensor([y + [-100] * (width - len(y)) for y in labels]))

    train = [r for r in rows if split[r["id"]] == "train"]
    val = [r for r in rows if split[r["id"]] != "train"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    t0 = time.monotonic()
    metrics, val_losses, tokens_seen = [], {}, 0
    for step in range(1, steps + 1):
        batch = [train[(step * 8 + i) % len(train)] for i in range(8)]
        ids, mask, labels = encode(batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        tokens_seen += int(mask.sum())
        optimizer.step()
        optimizer.zero_grad()
        record = {"step": step, "epoch": step * 8 / len(train), "loss": loss.item(), "lr": 1e-2,
                  "tokens_per_s": tokens_seen / max(1e-9, time.monotonic() - t0),
                  "elapsed_s": time.monotonic() - t0}
        if step % 10 == 0 or step == steps:
            with torch.no_grad():
                ids, mask, labels = encode(val)
                record["val_loss"] = val_losses[step] = float(model(input_ids=ids, attention_mask=mask,
                                                                    labels=labels).loss)
        metrics.append(record)
    (out_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    model.save_pretrained(out_path / "adapter")
    best_step = min(val_losses, key=val_losses.get)
    summary = {
        "complete": True, "steps": steps, "final_loss": metrics[-1]["loss"],
        "final_val_loss": metrics[-1]["val_loss"], "best_val_loss": val_losses[best_step], "best_step": best_step,
        "tokens_per_s": metrics[-1]["tokens_per_s"], "wall_s": time.monotonic() - t0,
        "split": {"train": len(train), "validation": len(val)}, "skipped": 0, "padding_waste": 0.0,
        "data": gen_dir, "student": model_dir, "task": "language-id", "teacher": model_dir, "workers": 1,
        "config": {"lr": 1e-2, "steps": steps, "lora_r": 8},
    }
    (out_path / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the session's generation, one training output, one evaluation for the whole module (engines are the
# slow part).
@pytest.fixture(scope="module")
def generated(tiny_generation) -> str:
    """The session's tiny-teacher generation (conftest.tiny_generation, 24 rows of the bundled sample with gold
    labels): every third id is held out, so the report scores 8 rows."""
    return tiny_generation


@pytest.fixture(scope="module")
def trained(generated, tiny_model, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("eval") / "train")
    make_training_output(generated, tiny_model, out, steps=20)
    return out


@pytest.fixture(scope="module")
def evaluated(trained) -> tuple[str, dict]:
    from distill.evaluate.config import EvalConfig
    from pipelines.evaluate import main

    out = str(Path(trained).parent / "report")
    report = main(EvalConfig(train=trained, output=out))
    return out, report


def _split_ids(train_dir: str, split: str) -> set[str]:
    table = pq.read_table(Path(train_dir) / "split.parquet").to_pylist()
    return {r["id"] for r in table if r["split"] == split}


# ----------------------------------------------------------------------------------------------------------------
# Without engines
def test_scored_tokens_are_the_answer_through_its_end_of_turn(tiny_model, generated):
    """What the engines score for the NLLs: the teacher's answer and the end-of-turn token after the context the
    engine renders (the same split of a conversation that training uses)."""
    from transformers import AutoTokenizer

    from distill.evaluate.scores import answer_tokens
    from distill.tasks import load_task

    task = load_task("language-id")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = read_columns(f"{generated}/data", ["text", "answer"]).to_pylist()[:5]
    for messages in (task.student_messages, task.teacher_messages):
        for r in rows:
            context, answer = answer_tokens(tokenizer, messages(r["text"]), r["answer"])
            assert tokenizer.decode(answer) == r["answer"] + tokenizer.eos_token
            text = tokenizer.apply_chat_template(messages(r["text"]), add_generation_prompt=True, tokenize=False)
            assert context == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_heldout_rows_come_from_the_training_split_or_all_of_data(generated, trained, tiny_model):
    from distill.config import ConfigError
    from distill.evaluate.inputs import resolve_inputs
    from distill.evaluate.config import EvalConfig

    inputs = resolve_inputs(EvalConfig(train=trained))
    assert {r["id"] for r in inputs.rows} == _split_ids(trained, "test")
    assert (inputs.teacher, inputs.student, inputs.task.name) == (tiny_model, tiny_model, "language-id")
    assert inputs.adapter == f"{trained}/adapter"
    assert [m["step"] for m in inputs.train_metrics] == list(range(1, 21))

    # --data: every row of a generation output (or of a Parquet file) is held out; models from the data.
    all_ids = set(read_columns(f"{generated}/data", ["id"]).column("id").to_pylist())
    explicit = resolve_inputs(EvalConfig(data=generated, student=tiny_model, adapter=f"{trained}/adapter"))
    assert {r["id"] for r in explicit.rows} == all_ids and explicit.teacher == tiny_model
    shard = sorted(Path(generated, "data").glob("*.parquet"))[0]
    from_file = resolve_inputs(EvalConfig(data=str(shard), student=tiny_model, adapter=f"{trained}/adapter",
                                          limit=3))
    assert len(from_file.rows) == 3

    with pytest.raises(ConfigError, match="--train OUT"):
        resolve_inputs(EvalConfig())
    with pytest.raises(ConfigError, match="adapter"):
        resolve_inputs(EvalConfig(data=generated, student=tiny_model))
    # No student given: the adapter's own adapter_config.json names its base model.
    bare = resolve_inputs(EvalConfig(data=generated, adapter=f"{trained}/adapter"))
    assert bare.student == tiny_model
    with pytest.raises(ConfigError, match="no rows in split 'nope'"):
        resolve_inputs(EvalConfig(train=trained, split="nope"))


def test_cli_registers_eval():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["eval", "--train", "OUT", "--output", "R", "--limit", "5"])
    assert (args.train, args.output, args.limit) == ("OUT", "R", 5)


# ----------------------------------------------------------------------------------------------------------------
# With engines: the full report
def test_full_report_with_the_tiny_model(evaluated, trained, tiny_model):
    from transformers import AutoTokenizer

    from distill.evaluate.render import REPORT_KEYS
    from distill.tasks import load_task

    out, report = evaluated
    saved = json.loads((Path(out) / "report.json").read_text())
    assert set(saved) == set(REPORT_KEYS), "report.json keys must be exactly the documented ones"
    assert saved["schema_version"] == 2

    # Only the test split was scored: no query the student trained on or was selected on.
    held = _split_ids(trained, "test")
    preds = pq.read_table(Path(out) / "predictions.parquet").to_pylist()
    assert {p["id"] for p in preds} == held and saved["inputs"]["rows"] == len(held)
    assert not held & (_split_ids(trained, "train") | _split_ids(trained, "validation"))

    # Three runs, every request answered by a real engine.
    for run in ("teacher", "student", "base"):
        r = saved["runs"][run]
        assert (r["requests"], r["errors"]) == (len(held), 0), run
        assert 0 < r["latency_s"]["p50"] <= r["latency_s"]["p95"] <= r["latency_s"]["max"]
        assert r["output_tokens_mean"] > 0
    assert saved["runs"]["teacher"]["parse_rate"] == 1.0          # the teacher decodes under guided choice

    # The teacher saw the task prompt and the students did not: the engines' prompt token counts are exactly the
    # chat-templated teacher / student conversations.
    task = load_task("language-id")
    tok = AutoTokenizer.from_pretrained(tiny_model)

    def n_tokens(messages):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for p in preds:
        assert p["teacher_prompt_tokens"] == n_tokens(task.teacher_messages(p["text"]))
        assert p["student_prompt_tokens"] == p["base_prompt_tokens"] == n_tokens(task.student_messages(p["text"]))
    # Base and distilled student share an engine; greedy decoding of the same prompt differs only if the distilled
    # rows went through the adapter and the base rows did not.
    assert any(p["student_output"] != p["base_output"] for p in preds)

    # Label metrics against the teacher and against gold.
    labels = saved["labels"]
    assert {"student_vs_teacher", "base_vs_teacher", "teacher_vs_gold", "student_vs_gold"} <= set(labels["confusion"])
    cm = labels["confusion"]["student_vs_teacher"]
    assert sum(map(sum, cm["matrix"])) + cm["skipped"] == len(held)
    judged = [p for p in preds if p["teacher_label"] is not None]
    agree = sum(p["student_label"] == p["teacher_label"] for p in judged)
    assert saved["fidelity"]["student"]["judged"] == len(judged) == len(held)  # the guided teacher always parses
    assert saved["fidelity"]["student"]["agreement"] == pytest.approx(agree / len(judged))
    # The floor, the ceiling (a second teacher sample for every query) and a verdict that says ship or not.
    labels_given = [p["teacher_label"] for p in preds]
    top = max(set(labels_given), key=labels_given.count)
    assert saved["fidelity"]["floor"]["rate"] == pytest.approx(labels_given.count(top) / len(preds))
    assert all(p["teacher_sample_output"] for p in preds)
    assert saved["verdict"]["ready"] == (saved["fidelity"]["student"]["agreement"] >= 0.9)
    assert saved["verdict"]["text"].startswith("Ready to ship" if saved["verdict"]["ready"] else "Not ready to ship")
    # Every student answer carries its confidence: the probability of the answer it gave.
    assert all(0 < p["student_confidence"] <= 1 and 0 < p["base_confidence"] <= 1 for p in preds)
    gold_rows = [p for p in preds if p["gold"] is not None]
    assert saved["gold"]["rows"] == len(gold_rows) > 0
    assert saved["gold"]["accuracy"]["teacher"] == pytest.approx(
        sum(p["teacher_label"] == p["gold"] for p in gold_rows) / len(gold_rows))

    # Prompt absorption, scored on the engines: the adapter was trained on this answer format, so it makes the
    # held-out answers likelier.
    nll = saved["nll"]
    assert nll["rows_scored"] == len(held) and "teacher-forced" in nll["method"]
    a, b, c = nll["base_no_prompt"], nll["base_with_prompt"], nll["student_no_prompt"]
    assert all(math.isfinite(x) and x > 0 for x in (a, b, c))
    assert c < a
    assert nll["gap_closed"] == pytest.approx((a - c) / (a - b))

    # Cost: the student drops the prompt, so it is cheaper per request; break-even follows from what generation,
    # training and this evaluation cost.
    cost = saved["cost"]
    assert cost["per_request_usd"]["teacher"] > cost["per_request_usd"]["student"] > 0
    assert 1000 < cost["cached_prompt_tokens"] < saved["runs"]["teacher"]["prompt_tokens_mean"]
    summary = json.loads((Path(trained) / "train_summary.json").read_text())
    d = cost["distillation_usd"]
    assert d["training_usd"] == pytest.approx(summary["wall_s"] / 3600 * 1.0 * summary["workers"])
    assert d["generation_usd"] > 0 and d["evaluation_usd"] > 0
    assert cost["break_even_queries"] == math.ceil(d["total_usd"] / cost["savings_per_query_usd"] * (1 - 1e-12))
    assert saved["training"]["steps"] == summary["steps"]

    # Plots beside the page, each a real PNG; a short markdown with the headline numbers.
    assert {"loss_curves", "latency_hist", "tokens", "nll", "confusion_student_vs_teacher"} <= set(saved["plots"])
    for name in saved["plots"].values():
        data = (Path(out) / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    md = (Path(out) / "report.md").read_text()
    assert "gap closed" in md and "agreement with teacher" in md and "ship" in md
    # The distilled student was judged as it ships on a CPU: merged once beside its adapter, where `distill serve`
    # finds it (the marker names the base and the adapter's digest), and the report names that artifact.
    merged = Path(trained) / "adapter-merged"
    assert saved["inputs"]["student_serving"] == "merged" and (merged / "config.json").is_file()
    assert json.loads((merged / "distill_merged.json").read_text())["adapter"] == str(Path(trained) / "adapter")
    assert saved["inputs"]["student_artifact"]["engine_model"] == str(merged)
    assert saved["inputs"]["student_artifact"]["lora"] is None


def _chromium() -> str:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to check the HTML report: apt-get install -y chromium")


def _chromium_run(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    # Offline, sandbox-free (CI runs as root), no GPU; virtual time lets the page finish loading its images
    # before the DOM is dumped or the screenshot taken.
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=10000", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _image_states(dom: str) -> dict[str, str]:
    """{plot name: data-loaded value} for every <img> of the page, as the page's own handlers recorded them."""
    states = {}
    for tag in re.findall(r"<img\b[^>]*>", dom):
        name = re.search(r'data-plot="([^"]+)"', tag).group(1)
        loaded = re.search(r'data-loaded="([^"]*)"', tag)
        states[name] = loaded.group(1) if loaded else "pending"
    return states


def test_html_report_renders_in_headless_chromium(evaluated, tmp_path):
    import matplotlib.image as mpimg
    import numpy as np

    out, report = evaluated
    page = Path(out) / "report.html"
    plots = json.loads((Path(out) / "report.json").read_text())["plots"]

    # Every plot is an <img> that the browser decoded (naturalWidth > 0), none failed or is still pending.
    result = _chromium_run(page, tmp_path / "profile-dom", "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    states = _image_states(result.stdout)
    assert set(states) == set(plots)
    for name, state in states.items():
        assert state.isdigit() and int(state) > 0, f"plot {name} did not render: {state}"

    # The screenshot: a real, non-blank page.
    shot = tmp_path / "report.png"
    result = _chromium_run(page, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,2400")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = mpimg.imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    colors = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 200, "the screenshot is nearly blank"
    shutil.copy(shot, Path(out) / "screenshot.png")  # kept beside the report for a person to look at

    # The check itself can fail: the same page with one plot missing reports exactly that plot as broken.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / plots["nll"]).unlink()
    result = _chromium_run(broken / "report.html", tmp_path / "profile-broken", "--dump-dom")
    states = _image_states(result.stdout)
    assert states["nll"] == "error"
    assert all(int(v) > 0 for k, v in states.items() if k != "nll")
    assert "plot failed to load" in result.stdout
