"""`distill compare-latency`: the same queries to the teacher and the student through Serve; a table, a JSON
report and a PNG plot.

    distill compare-latency --url http://127.0.0.1:8000 --limit 100
    distill compare-latency --teacher MODEL --student MODEL_DIR --adapter OUT/adapter   # starts Serve itself

`order: paired` (the default) sends each query to every model back to back (teacher, then student), so slow
phases of a shared machine hit both arms alike; `order: separate` sends all queries to one model, then to the
next, so that at a concurrency above 1 each model is measured under its own load alone. Latency is measured at
the client, end to end through Serve's HTTP proxy and gateway; the gateway's own time per request (its
x-distill-gateway-ms header: its handler minus the arms' time) is summarised beside it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from distill.config import StrictModel
from distill.local_models import sample_data_path
from serve.config import STUDENT_MODEL, TEACHER_MODEL, ServeConfig
from distill.metrics import quantile

log = logging.getLogger("distill.serve.latency")


class CompareLatencyConfig(StrictModel):
    url: Optional[str] = Field(None, description="Base URL of a running `distill serve`; none: start one from "
                               "`serve` for the comparison and stop it afterwards.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="What to start when no url is given.")
    api_key: Optional[str] = Field(None, description="API key of the server (default: $DISTILL_API_KEY).")
    input: str = Field(str(sample_data_path()), description="Queries: .txt/.jsonl/.parquet file or folder.")
    text_column: str = Field("text", description="Column holding the query text (.jsonl/.parquet).")
    limit: int = Field(50, ge=1, description="Queries sent to each model.")
    models: list[str] = Field([TEACHER_MODEL, STUDENT_MODEL], min_length=1, description="Models compared.")
    concurrency: int = Field(1, ge=1, description="Queries in flight at once (1: latency without queueing).")
    order: Literal["paired", "separate"] = Field(
        "paired", description="paired: each query to every model back to back; separate: all queries to one "
        "model, then the next (each model's load alone).")
    warmup: int = Field(2, ge=0, description="Untimed requests per model first (engine warm-up, prefix cache).")
    max_tokens: Optional[int] = Field(None, ge=1, description="max_tokens per request (default: each arm's).")
    timeout_s: float = Field(300.0, gt=0, description="Per-request client timeout.")
    output: str = Field("runs/compare-latency", description="Folder for latency.json and latency.png.")


def load_queries(config: CompareLatencyConfig) -> list[str]:
    from distill.inputs import read_queries

    texts = [row.text for row in read_queries(config.input, config.text_column, limit=config.limit)
             if not row.reason]
    if not texts:
        raise ValueError(f"{config.input}: no usable queries")
    return texts


async def _measure(url: str, api_key: Optional[str], models: list[str], queries: list[str], concurrency: int,
                   warmup: int, max_tokens: Optional[int], timeout_s: float,
                   order: str = "paired") -> dict[str, list[dict]]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: dict[str, list[dict]] = {m: [] for m in models}
    semaphore = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        async def one(model: str, query: str, keep: bool) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": query}]}
            if max_tokens:
                body["max_tokens"] = max_tokens
            t0 = time.perf_counter()
            try:
                response = await client.post("/v1/chat/completions", json=body)
                status, payload = response.status_code, response.json()
            except (httpx.HTTPError, ValueError) as err:
                status, payload = 0, {"error": {"message": str(err)}}
            latency = time.perf_counter() - t0
            if keep:
                record = {"latency_s": latency, "status": status}
                if status == 200:
                    record.update(prompt_tokens=payload["usage"]["prompt_tokens"],
                                  completion_tokens=payload["usage"]["completion_tokens"],
                                  gateway_ms=float(response.headers["x-distill-gateway-ms"]),
                                  confidence=payload.get("confidence"))
                else:
                    record["error"] = payload.get("error", {}).get("message")
                results[model].append(record)

        for model in models:
            for query in queries[:warmup]:
                await one(model, query, keep=False)

        async def pair(query: str, each: list[str]) -> None:
            async with semaphore:
                for model in each:
                    await one(model, query, keep=True)

        if order == "paired":
            await asyncio.gather(*(pair(q, models) for q in queries))
        else:
            for model in models:
                await asyncio.gather(*(pair(q, [model]) for q in queries))
    return results


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for model, records in results.items():
        ok = [r for r in records if r["status"] == 200]
        latencies = [r["latency_s"] for r in ok]
        summary[model] = {
            "requests": len(records), "errors": len(records) - len(ok),
            "p50_s": quantile(latencies, 0.5), "p95_s": quantile(latencies, 0.95),
            "mean_s": sum(latencies) / len(latencies) if latencies else None,
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / len(ok) if ok else None,
            "completion_tokens_mean": sum(r["completion_tokens"] for r in ok) / len(ok) if ok else None,
            "gateway_ms_p50": quantile([r["gateway_ms"] for r in ok], 0.5),
            "gateway_ms_p95": quantile([r["gateway_ms"] for r in ok], 0.95),
        }
    return summary


def table(summary: dict[str, dict]) -> str:
    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    header = f"{'model':<12} {'requests':>8} {'errors':>6} {'p50 ms':>9} {'p95 ms':>9} {'mean ms':>9} " \
             f"{'prompt tok':>10} {'output tok':>10} {'gateway p50 ms':>14}"
    lines = [header, "-" * len(header)]
    for model, s in summary.items():
        ms = {k: s[k] * 1000 if s[k] is not None else None for k in ("p50_s", "p95_s", "mean_s")}
        lines.append(f"{model:<12} {s['requests']:>8} {s['errors']:>6} {fmt(ms['p50_s'], '9.1f')} "
                     f"{fmt(ms['p95_s'], '9.1f')} {fmt(ms['mean_s'], '9.1f')} "
                     f"{fmt(s['prompt_tokens_mean'], '10.1f')} {fmt(s['completion_tokens_mean'], '10.1f')} "
                     f"{fmt(s['gateway_ms_p50'], '14.2f')}")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], summary: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    fig, (box, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = list(results)
    data = [[r["latency_s"] * 1000 for r in results[m] if r["status"] == 200] for m in models]
    box.boxplot(data, showfliers=True)
    box.set_xticks(range(1, len(models) + 1), models)
    box.set_ylabel("latency (ms)")
    box.set_title("latency per request")
    for m, values in zip(models, data):
        if values:
            xs = sorted(values)
            cdf.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))],
                     label=f"{m}: p50 {summary[m]['p50_s'] * 1000:.0f} ms, p95 {summary[m]['p95_s'] * 1000:.0f} ms")
    cdf.set_xlabel("latency (ms)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("cumulative distribution")
    cdf.legend(loc="lower right")
    fig.suptitle("teacher (with the task prompt) vs. distilled student, through Ray Serve")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(config: CompareLatencyConfig) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request drowns the table
    queries = load_queries(config)
    api_key = config.api_key or os.environ.get("DISTILL_API_KEY")
    started_here = config.url is None
    if started_here:
        from serve.app import start, stop

        url = start(config.serve)
        api_key = api_key or config.serve.api_key
    else:
        url = config.url.rstrip("/")
    try:
        t0 = time.monotonic()
        results = asyncio.run(_measure(url, api_key, config.models, queries, config.concurrency, config.warmup,
                                       config.max_tokens, config.timeout_s, config.order))
        seconds = time.monotonic() - t0
    finally:
        if started_here:
            stop(config.serve)
    summary = summarise(results)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    report = {"url": url, "queries": len(queries), "concurrency": config.concurrency, "order": config.order,
              "seconds": round(seconds, 3), "summary": summary, "requests": results}
    (out / "latency.json").write_text(json.dumps(report, indent=2))
    plot(results, summary, out / "latency.png")
    report["table"] = table(summary)
    return report
