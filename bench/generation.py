"""Generation benchmarks P1, P2, P3, P7 (see bench/README.md for the goals).

P1  pipeline rows/s ÷ raw single-process vLLM `LLM.chat` rows/s (same rows, model, sampling; engine start-up
    included on both sides, since a user pays it on both)
P2  pipeline rows/s ÷ sequential per-query Hugging Face `generate` rows/s (the seeds' approach)
P3  teacher cost with the long shared prompt ÷ the same queries without it, prefix caching on and off
    (in-engine generate time of raw vLLM, engine start-up excluded: this is about per-query cost)
P7  peak memory (driver + Ray + engines) of the pipeline at N and 10·N rows (tiny model: memory, not speed)
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

from bench.common import run_script, verdict, write_result
from distill.models import default_model_dir, sample_data_path, tiny_model_dir


def write_queries(path: Path, rows: int) -> str:
    texts = [json.loads(line)["text"] for line in sample_data_path().read_text(encoding="utf-8").splitlines()]
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):  # explicit ids: texts repeat beyond the sample's size
            f.write(json.dumps({"id": f"q{i}", "text": texts[i % len(texts)]}, ensure_ascii=False) + "\n")
    return str(path)


def run_pipeline(model: str, rows: int, work: Path, tag: str, batch_size: int = 32) -> dict:
    source = write_queries(work / f"{tag}.jsonl", rows)
    config = work / f"{tag}.yaml"
    config.write_text(json.dumps({"engine": {"batch_size": batch_size}, "progress_seconds": 30}))
    out = work / f"{tag}-out"
    run = run_script(["-m", "distill.cli", "generate", "--input", source, "--output", str(out), "--teacher", model,
                      "--config", str(config)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rows_in"] == rows, manifest
    return {"rows": rows, "total_s": manifest["timings"]["total_s_this_run"], "peak_rss_gib": run["peak_rss_gib"],
            "written": manifest["rows_written"]}


def baseline(kind: str, model: str, rows: int, *flags: str) -> dict:
    return run_script(["-m", "bench.baselines", kind, "--model", model, "--rows", str(rows), *flags])


def main(rows: int = 200, hf_rows: int = 40, p3_rows: int = 60, p7_rows: int = 300, repeats: int = 2) -> None:
    model = default_model_dir()
    results, table = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # P1 and P2: end-to-end rows/s, medians over repeats.
        pipe_runs = [run_pipeline(model, rows, work, f"p1-{i}") for i in range(repeats)]
        raw_runs = [baseline("vllm", model, rows, "--max-tokens", "16") for _ in range(repeats)]
        hf = baseline("hf", model, hf_rows, "--max-tokens", "8")
        pipe_rps = statistics.median(r["rows"] / r["total_s"] for r in pipe_runs)
        raw_rps = statistics.median(r["rows"] / r["total_s"] for r in raw_runs)
        hf_rps = hf["rows"] / hf["total_s"]
        p1, p2 = pipe_rps / raw_rps, pipe_rps / hf_rps
        results["P1"] = {"pipeline_rows_per_s": pipe_rps, "raw_vllm_rows_per_s": raw_rps, "ratio": p1,
                         "pipeline_runs": pipe_runs, "raw_runs": raw_runs}
        results["P2"] = {"pipeline_rows_per_s": pipe_rps, "hf_loop_rows_per_s": hf_rps, "ratio": p2, "hf_run": hf}
        table.append(("P1 pipeline ÷ raw vLLM rows/s", f"{p1:.2f} ({pipe_rps:.2f} vs {raw_rps:.2f} rows/s, "
                      f"{rows} rows)", "≥ 0.9", verdict(p1, 0.9)))
        table.append(("P2 pipeline ÷ sequential HF generate", f"{p2:.1f}× ({hf_rps:.2f} rows/s HF)", "≥ 15× (CPU)",
                      verdict(p2, 15)))

        # P3: in-engine cost of the long prompt, caching on and off.
        p3 = {}
        for caching in (True, False):
            flags = [] if caching else ["--no-prefix-caching"]
            with_prompt = baseline("vllm", model, p3_rows, "--max-tokens", "16", *flags)
            no_prompt = baseline("vllm", model, p3_rows, "--max-tokens", "16", "--no-prompt", *flags)
            p3["on" if caching else "off"] = {"with_prompt": with_prompt, "no_prompt": no_prompt,
                                              "ratio": with_prompt["generate_s"] / no_prompt["generate_s"]}
        results["P3"] = p3
        table.append(("P3 prompt ÷ no prompt, prefix caching on", f"{p3['on']['ratio']:.2f}×", "≤ 1.5×",
                      verdict(p3["on"]["ratio"], 1.5, higher_is_better=False)))
        table.append(("P3 prompt ÷ no prompt, prefix caching off", f"{p3['off']['ratio']:.2f}×", "(reference)", ""))

        # P7: streaming, not materializing: peak memory barely grows with 10x the rows.
        small = run_pipeline(tiny_model_dir(), p7_rows, work, "p7-small")
        large = run_pipeline(tiny_model_dir(), 10 * p7_rows, work, "p7-large")
        p7 = large["peak_rss_gib"] / small["peak_rss_gib"]
        results["P7"] = {"small": small, "large": large, "ratio": p7}
        table.append((f"P7 peak memory {10 * p7_rows} ÷ {p7_rows} rows",
                      f"{p7:.2f}× ({small['peak_rss_gib']:.2f} → {large['peak_rss_gib']:.2f} GiB)", "≤ 1.2×",
                      verdict(p7, 1.2, higher_is_better=False)))
    write_result("generation", {"rows": rows, "repeats": repeats, "results": results}, table)


if __name__ == "__main__":
    main()
