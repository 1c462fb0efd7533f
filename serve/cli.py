"""`distill serve` and `distill compare-latency`. Kept apart from serve/app.py so that building the `distill`
parser does not import Ray Serve and FastAPI for every other subcommand."""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

from distill.config import ConfigError, build_config, read_yaml


def _serve_options(p) -> None:
    p.add_argument("--config", help="YAML file with the config's fields (command-line options override it)")
    p.add_argument("--task", help="built-in task name or task YAML path (default: language-id)")
    p.add_argument("--teacher", help="teacher model folder (default: the prepared SmolLM2)")
    p.add_argument("--student", help="the student's base model folder (default: the prepared SmolLM2)")
    p.add_argument("--adapter", help="the student's LoRA adapter for the task (OUT/adapter of `distill train`)")
    p.add_argument("--extra-adapter", action="append", default=[], metavar="NAME=PATH",
                   help="another adapter on the same base, served as model NAME (repeatable)")
    p.add_argument("--student-serving", choices=["auto", "merged", "lora"],
                   help="how the engine serves the adapter (default auto: merged for one adapter on CPU)")


def _serve_overrides(args, data: dict[str, Any], section: Optional[str] = None) -> dict[str, Any]:
    """Apply the shared serve options to a ServeConfig mapping (at `section` inside `data` when given)."""
    from distill.tasks import load_task

    target = data.setdefault(section, {}) if section else data
    if args.task:
        target["task"] = args.task
    if args.teacher:
        target.setdefault("teacher", {})["model"] = args.teacher
    if args.student:
        target.setdefault("student", {})["model"] = args.student
    adapters = target.setdefault("student", {}).setdefault("adapters", {})
    if args.adapter:
        adapters[load_task(target.get("task", "language-id")).name] = args.adapter
    for item in args.extra_adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--extra-adapter {item!r}: expected NAME=PATH")
        adapters[name] = path
    if args.student_serving:
        target["student"]["serving"] = args.student_serving
    return data


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("serve", help="teacher and student side by side on Ray Serve (OpenAI API, A/B)")
    _serve_options(p)
    p.add_argument("--host", help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default: 8000)")
    p.add_argument("--api-key", help="the clients' key: 'Authorization: Bearer KEY' (default: $DISTILL_API_KEY)")
    p.add_argument("--admin-key", help="the key of /admin/*, recorded as 'admin' in the event log (default: "
                   "$DISTILL_ADMIN_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="INSECURE: allow a non-loopback --host without an API key")
    p.add_argument("--student-share", type=float, help="student's share of the routed model at start (0..1)")
    p.add_argument("--shadow-rate", type=float, help="fraction of student-served requests shadowed to the teacher")
    p.add_argument("--mode", choices=["split", "cascade"], help="the routed model's mode (default: split)")
    p.add_argument("--threshold", type=float, help="the cascade's confidence threshold")
    p.add_argument("--threshold-from", metavar="REPORT",
                   help="take the cascade threshold from a `distill eval` report.json (selective.threshold)")
    p.add_argument("--capture", metavar="URI", help="keep the routed model's teacher answers as training data "
                   "in URI/data (the generation format; `distill train --data URI` reads it)")
    p.add_argument("--reference-data", metavar="URI", help="the generation output the student was trained on, "
                   "for the label drift signal")
    p.set_defaults(func=_serve_cli)

    p = subparsers.add_parser("compare-latency", help="same queries to teacher and student through Serve")
    _serve_options(p)
    p.add_argument("--url", help="a running `distill serve` (default: start one with the options above)")
    p.add_argument("--input", help="queries file or folder (default: the bundled sample)")
    p.add_argument("--limit", type=int, help="queries per model (default: 50)")
    p.add_argument("--concurrency", type=int, help="queries in flight at once (default: 1)")
    p.add_argument("--output", help="folder for latency.json and latency.png (default: runs/compare-latency)")
    p.set_defaults(func=_compare_cli)


def _serve_cli(args) -> None:
    from ray import serve

    from serve.app import start, stop
    from serve.config import ServeConfig

    data = read_yaml(args.config) if args.config else {}
    _serve_overrides(args, data)
    for key, value in (("host", args.host), ("port", args.port), ("api_key", args.api_key),
                       ("capture", args.capture)):
        if value is not None:
            data[key] = value
    if args.admin_key:
        data["admin_keys"] = {"admin": args.admin_key}
    if args.insecure_no_auth:
        data["insecure_no_auth"] = True
    rollout = data.setdefault("rollout", {})
    for key, value in (("student_share", args.student_share), ("shadow_sample_rate", args.shadow_rate),
                       ("mode", args.mode)):
        if value is not None:
            rollout[key] = value
    for key, value in (("threshold", args.threshold), ("threshold_from", args.threshold_from)):
        if value is not None:
            cascade = rollout.setdefault("cascade", {})
            cascade.pop("threshold" if key == "threshold_from" else "threshold_from", None)  # the flag wins
            cascade[key] = value
    if args.reference_data:
        rollout.setdefault("drift", {})["reference_data"] = args.reference_data
    config = build_config(ServeConfig, data, args.config or "command line")
    url = start(config)
    auth = ' -H "Authorization: Bearer $DISTILL_API_KEY"' if (config.api_key or _env_key()) else ""
    admin = ' -H "Authorization: Bearer <admin key>"' if (config.admin_keys or os.environ.get("DISTILL_ADMIN_KEY")) \
        else ""
    routed = config.routed_model
    print(f"""
distill serve is up at {url}  (Ctrl-C to stop)

  curl -s {url}/v1/models{auth}
  curl -s {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
       -d '{{"model": "teacher", "messages": [{{"role": "user", "content": "Jeder hat das Recht auf Leben."}}]}}'
  curl -s {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
       -d '{{"model": "{routed}", "user": "alice", "messages": [{{"role": "user", "content": "Hello there"}}]}}'
  curl -s {url}/admin/share{admin} -H 'Content-Type: application/json' -d '{{"student_share": 0.1}}'
  curl -s {url}/stats{auth}
  curl -s {url}/metrics{auth}
""", flush=True)
    # SIGTERM (docker stop, systemd, a job scheduler) shuts down as cleanly as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while serve.status().applications.get(config.app_name) is not None:
            time.sleep(5)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        stop(config)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _env_key() -> Optional[str]:
    return os.environ.get("DISTILL_API_KEY")


def _compare_cli(args) -> None:
    from serve.latency import CompareLatencyConfig, main

    data = read_yaml(args.config) if args.config else {}
    _serve_overrides(args, data, section="serve")
    for key, value in (("url", args.url), ("input", args.input), ("limit", args.limit),
                       ("concurrency", args.concurrency), ("output", args.output)):
        if value is not None:
            data[key] = value
    config = build_config(CompareLatencyConfig, data, args.config or "command line")
    report = main(config)
    print(report["table"])
    print(f"\nreport: {config.output}/latency.json\nplot:   {config.output}/latency.png")
