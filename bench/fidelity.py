"""Fidelity benchmark: which training method brings the student closest to its teacher, at equal training steps.

    python -m bench.run fidelity                    # on the demo's data (generated first if missing)
    python -m bench.fidelity --data runs/demo/generate --demo runs/demo   # after `make demo`: reuses its soft SFT

Four methods, each the same number of optimizer steps of the same batch on the same generation output (the
demo's: SmolLM2 teaching itself support-routing), each evaluated by `distill eval` on the same test split:
- hard SFT: the teacher's sampled answers as targets (soft_label_weight 0);
- soft SFT: the same plus KL to the teacher's top-20 logprobs at each answer token (the default where free);
- on-policy: the student samples answers without the prompt, the prompted teacher scores those tokens under the
  task's answer grammar (as it generated), reverse KL on them; 2 rounds of half the steps each, from the base
  student;
- SFT then on-policy: half the steps of soft SFT, then one on-policy round of the other half from its adapter.
On-policy rounds also spend engine time sampling and scoring: the table's wall time counts it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.common import run_script, write_result
from distill.storage import read_json

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
DEMO_STEPS = 80  # the demo's max_steps: 80 steps of 8 of its ~560 training rows, what `make demo` trains


def methods(train: dict[str, Any], steps: int, engine: dict[str, Any]) -> list[tuple[str, str, list[dict]]]:
    """(key, title, the train configs run one after another; a later one starts from the earlier's adapter)."""
    half = max(1, steps // 2)
    # Enough passes that max_steps, not the end of the data, ends every SFT run: equal steps for every method.
    sft = {**train, "max_steps": steps, "epochs": max(train.get("epochs", 1), 10)}
    on_policy = {"method": "on-policy", "on_policy": {"engine": engine}}
    return [
        ("hard", "hard-label SFT", [{**sft, "soft_label_weight": 0.0}]),
        ("soft", "soft-label SFT (top-20 KL)", [sft]),
        ("on-policy", "on-policy (reverse KL, 2 rounds)",
         [{**sft, **on_policy, "on_policy": {**on_policy["on_policy"], "rounds": 2, "steps_per_round": half}}]),
        ("sft+on-policy", "soft SFT, then 1 on-policy round",
         [{**sft, "max_steps": half},
          {**sft, **on_policy, "on_policy": {**on_policy["on_policy"], "rounds": 1, "steps_per_round": steps - half}}]),
    ]


def run_method(work: Path, data: str, configs: list[dict], eval_config: dict) -> dict[str, Any]:
    """Train `configs` one after another into WORK/train-I, evaluate the last. A method whose folder holds an
    evaluation newer than its training, of the same configs, is read, not rerun (a kept --keep folder)."""
    work.mkdir(parents=True, exist_ok=True)
    texts, adapter = [], None
    for i, config in enumerate(configs):
        texts.append(yaml.safe_dump({**config, "merge": True, **({"init_adapter": adapter} if adapter else {})}))
        adapter = str(work / f"train-{i}" / "adapter")
    texts.append(yaml.safe_dump(eval_config))
    paths = [work / f"train-{i}.yaml" for i in range(len(configs))] + [work / "eval.yaml"]
    done = [work / f"train-{i}" / "train_summary.json" for i in range(len(configs))] + [work / "eval" / "report.json"]
    reusable = all(p.exists() and p.read_text() == t for p, t in zip(paths, texts)) and all(d.exists() for d in done) \
        and all(a.stat().st_mtime < done[-1].stat().st_mtime for a in done[:-1])
    if not reusable:
        for i in range(len(configs)):
            paths[i].write_text(texts[i])
            run_script(["-m", "pipelines.cli", "train", "--data", data, "--output", str(work / f"train-{i}"),
                        "--config", str(paths[i])], timeout=3600)
        paths[-1].write_text(texts[-1])
        run_script(["-m", "pipelines.cli", "eval", "--train", str(work / f"train-{len(configs) - 1}"), "--output",
                    str(work / "eval"), "--config", str(paths[-1])], timeout=3600)
    report = read_json(str(done[-1]))
    wall = sum(read_json(str(d))["wall_s"] for d in done[:-1])
    return {"train_wall_s": round(wall, 1), "steps": sum(c.get("max_steps", 0) if c.get("method") != "on-policy"
                                                         else c["on_policy"]["rounds"] * c["on_policy"]["steps_per_round"]
                                                         for c in configs),
            "headline": report["headline"], "fidelity": report["fidelity"], "nll": report["nll"],
            "verdict": report["verdict"]["text"], "eval_wall_s": report["seconds"], "reused": reusable}


def demo_result(demo: str, summary: dict[str, Any], steps: int) -> dict[str, Any] | None:
    """The soft-SFT row from a finished `make demo` output (its training summary given; its training is that
    method at the demo's settings), so the comparison need not train and evaluate it again; None when the demo
    ran other settings."""
    report = read_json(str(Path(demo) / "eval" / "report.json"))
    if not summary or not report or summary.get("method") != "sft" or summary.get("planned_steps") != steps \
            or not summary.get("soft_label_weight"):
        return None
    return {"train_wall_s": round(summary["wall_s"], 1), "steps": steps, "headline": report["headline"],
            "fidelity": report["fidelity"], "nll": report["nll"], "verdict": report["verdict"]["text"],
            "eval_wall_s": report["seconds"], "from": demo}


def comparison_table(results: dict[str, dict]) -> tuple[list[tuple[str, str, str, str]], float, float]:
    """(table rows, ceiling, floor): every method's agreement against the teacher's self-agreement (the first
    method's evaluation gives the ceiling and the floor; every method has the same test rows)."""
    first = next(iter(results.values()))["fidelity"]
    ceiling, floor = first["ceiling"]["teacher_vs_sample"]["agreement"], first["floor"]["rate"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f} %"

    table = [(f"ceiling: the teacher against a second sample of itself ({first['student']['judged']} test rows)",
              pct(ceiling), "(reference)", ""),
             ("floor: always the teacher's commonest label", pct(floor), "(reference)", "")]
    for r in results.values():
        h = r["headline"]
        ci = h["agreement_ci95"]
        relative = h["agreement"] / ceiling if h["agreement"] is not None and ceiling else None
        gap = "n/a" if h["gap_closed"] is None else f"{h['gap_closed']:.2f}"
        kappa = "n/a" if h["kappa"] is None else f"{h['kappa']:.2f}"
        measured = (f"agreement {pct(h['agreement'])} (95 % CI {pct(ci[0]) if ci else 'n/a'}–"
                    f"{pct(ci[1]) if ci else 'n/a'}), κ {kappa}, {pct(relative)} of the teacher's self-agreement; "
                    f"answers in the task's format {pct(h.get('student_parse_rate'))}; gap closed {gap}; "
                    f"{r['steps']} steps, training {r['train_wall_s']:.0f} s")
        table.append((r["title"], measured, "≥ 90 % of the ceiling",
                      "met" if relative is not None and relative >= 0.9 else "MISSED"))
    return table, ceiling, floor


def main(data: str | None = None, steps: int | None = None, keep: str | None = None,
         demo: str | None = None) -> dict[str, Any]:
    demo_config = yaml.safe_load(DEMO.read_text())
    train = {k: v for k, v in demo_config["train"].items() if k not in ("merge",)}
    demo_summary = read_json(str(Path(demo) / "train" / "train_summary.json")) if demo else None
    if demo and not demo_summary:
        raise SystemExit(f"--demo {demo}: no train/train_summary.json there (run `make demo` first)")
    # The demo's planned steps (its max_steps, or one epoch where that is shorter) are the budget.
    steps = steps or (demo_summary["planned_steps"] if demo_summary else DEMO_STEPS)
    eval_config = demo_config.get("eval", {})
    engine = eval_config.get("engine", {})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(keep or tmp)
        if data is None:
            data = str(work / "generate")
            gen = work / "generate.yaml"
            gen.write_text(yaml.safe_dump({**demo_config["generate"], "task": demo_config["task"],
                                           **({"input": demo_config["input"]} if "input" in demo_config else {})}))
            run_script(["-m", "pipelines.cli", "generate", "--output", data, "--config", str(gen)], timeout=3600)
        results = {}
        for key, title, configs in methods(train, steps, engine):
            reused = demo_result(demo, demo_summary, steps) if demo and key == "soft" else None
            print(f"== fidelity: {title}" + (f" (the demo's run in {demo})" if reused else ""), flush=True)
            results[key] = {"title": title, **(reused or run_method(work / key, data, configs, eval_config))}
    table, ceiling, floor = comparison_table(results)
    result = {"data": data, "steps": steps, "ceiling_teacher_vs_sample": ceiling, "floor_majority": floor,
              "methods": results}
    write_result("fidelity", result, table)  # prints the table, the ceiling and floor rows with it
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a generation output (default: generate the demo's sample first)")
    parser.add_argument("--steps", type=int, help="optimizer steps per method (default: the demo's)")
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one)")
    parser.add_argument("--demo", help="a finished demo output (runs/demo): its training is the soft-SFT row; "
                        "use with --data DEMO/generate")
    args = parser.parse_args()
    main(args.data, args.steps, args.keep, args.demo)
    print(json.dumps({"done": True}))
