"""End to end: real Ray Serve, real vLLM engines (tiny model, real LoRA adapters, one of them in a local S3
server), real HTTP on 127.0.0.1.

One Serve application is started for the whole module (two engines take about a minute to start on 2 cores) and
every test talks to it over HTTP. Tests that depend on the rollout state set the share they need first. The
chaos test that kills the student replica runs after the A/B tests: the replacement takes an engine start-up.

The selective-serving tests come last, on the same Serve instance and port: `selective` replaces the application
by one with a single task adapter (which the CPU engine serves merged), the cascade, capture and drift.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx
import pytest

from distill.metrics import quantile
from serve.rollout import user_fraction

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ADMIN_KEY = "test-admin-456"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
QUERIES = [
    "Everyone has the right to life, liberty and security of person.",
    "Toute personne a droit à la vie, à la liberté et à la sûreté de sa personne.",
    "Jeder hat das Recht auf Leben, Freiheit und Sicherheit der Person.",
    "Todo individuo tiene derecho a la vida, a la libertad y a la seguridad de su persona.",
    "Всеки човек има право на живот, свобода и лична сигурност.",
    "每个人都有权享有生命、自由和人身安全。",
    "Herkes yaşamak, özgürlük ve kişi güvenliği hakkına sahiptir.",
    "Mọi người đều có quyền sống, quyền tự do và an toàn cá nhân.",
]
TEACHER_CHOICES = [f"Final Answer: {label}" for label in ("en", "fr", "de", "es", "ru", "zh", "tr", "vi")]
# The student is forced to a label the teacher never gives: every shadow comparison disagrees, deterministically.
STUDENT_CHOICES = ["Final Answer: ot"]
# Shorter than an engine start-up (40-50 s here): requests waiting for a killed student's replacement time out
# (the chaos test's error-rate rollback) however fast the CPU starts the new engine. At 60 s, an AVX-512 machine
# started it in time, 1 of 80 requests failed and nothing rolled back.
REQUEST_TIMEOUT_S = 20
BUCKET = "distill-serve-test"
ENGINE = {"max_model_len": 2048, "kv_cache_memory_bytes": 128 * 1024**2}


def make_adapter(base: str, dest, seed: int, rank: int = 8) -> str:
    """A real PEFT LoRA adapter on the tiny model, with random (non-zero) lora_B so it changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(str(dest))
    return str(dest)


@pytest.fixture(scope="module")
def s3(free_port):
    """A bucket on a local S3 server (moto, as in test_run_s3.py); yields its s3:// root and the environment a
    process needs to reach it. Only this driver and the processes given that environment can."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    yield f"s3://{BUCKET}", env
    patch.undo()
    server.stop()


def serve_config(tiny_model: str, port: int, **fields):
    """The config both applications of this module share (task, keys, limits, the guided teacher), plus
    `fields`."""
    from serve.config import ServeConfig

    return ServeConfig.model_validate({
        "task": "language-id", "port": port, "api_key": API_KEY, "admin_keys": {"ops": ADMIN_KEY},
        "max_request_bytes": 64 * 1024, "request_timeout_s": REQUEST_TIMEOUT_S,
        "teacher": {"model": tiny_model, "guided": True, "guided_choices": TEACHER_CHOICES, "temperature": 0.0,
                    "engine": ENGINE},
        **fields})


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model, tmp_path_factory, free_port, s3):
    from distill.storage import join, staged_dir
    from serve.app import start, stop

    bucket, s3_env = s3
    adapters = tmp_path_factory.mktemp("adapters")
    # The second adapter lives in the bucket only: the student replica downloads it (it has the bucket's
    # environment; the teacher has not), vLLM never sees the s3:// URI.
    in_bucket = join(bucket, "adapters", "langid-v2")
    with staged_dir(in_bucket) as folder:
        make_adapter(tiny_model, folder, seed=2, rank=16)
    config = serve_config(
        tiny_model, free_port(),
        student={"model": tiny_model, "guided": True, "guided_choices": STUDENT_CHOICES, "temperature": 0.0,
                 "engine": {**ENGINE, "env": s3_env}, "max_replicas": 2,
                 "adapters": {"language-id": make_adapter(tiny_model, adapters / "langid", seed=1),
                              "langid-v2": in_bucket}},
        rollout={"student_share": 0.0, "shadow_sample_rate": 0.0, "agreement_window": 10,
                 "min_agreement_samples": 10, "min_agreement": 0.9, "max_student_p95_s": None,
                 "error_window": 20, "min_error_samples": 10, "max_error_rate": 0.2, "persist_interval_s": 0.5})
    assert config.host == "127.0.0.1"
    url = start(config)
    yield url
    stop(config)


def post(url: str, path: str, body, headers=AUTH, timeout=120) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def set_share(url: str, share: float, shadow: float = 0.0) -> dict:
    r = post(url, "/admin/share", {"student_share": share, "shadow_sample_rate": shadow, "reason": "test"},
             headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def stats(url: str) -> dict:
    r = httpx.get(url + "/stats", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def chat(model: str, text: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# -- the OpenAI API ---------------------------------------------------------------------------------------------
def test_models_endpoint_lists_arms_routed_model_and_adapters(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=API_KEY)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"teacher", "student", "routed", "language-id", "langid-v2"}
    # Two adapters share the base engine: it keeps LoRA, and /v1/models says so (a field OpenAI clients ignore).
    student = models["student"].model_extra["distill"]
    assert (student["serving"], student["lora"]) == ("lora", True), student
    assert "2 adapters share one base engine" in student["why"]
    assert student_engine()["lora_enabled"] is True


def test_both_arms_answer_through_the_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=API_KEY)
    teacher = client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": QUERIES[0]}],
                                             max_tokens=8)
    student = client.chat.completions.create(model="student", messages=[{"role": "user", "content": QUERIES[0]}],
                                             max_tokens=8)
    assert teacher.choices[0].message.content in TEACHER_CHOICES
    assert student.choices[0].message.content in STUDENT_CHOICES
    # Each answer carries its confidence (a field OpenAI clients ignore, and a header): for a guided label the
    # probability of the label among the allowed ones, so the student, forced to one label, is sure of it.
    assert 0.0 < teacher.model_extra["confidence"] <= 1.0
    assert student.model_extra["confidence"] == pytest.approx(1.0, abs=1e-3)
    # The task prompt is added server-side for the teacher only: its prompt is far longer than the student's.
    assert teacher.usage.prompt_tokens > student.usage.prompt_tokens + 200
    assert student.usage.completion_tokens >= 1
    # Every adapter is also a model of its own, on the same base engine; this one was downloaded from the bucket
    # by the replica. It is another task's adapter, so the language-id choices do not bind it.
    other = client.chat.completions.create(model="langid-v2", messages=[{"role": "user", "content": QUERIES[1]}],
                                           max_tokens=12)
    assert other.usage.completion_tokens >= 1 and other.choices[0].message.content not in STUDENT_CHOICES
    raw = client.chat.completions.with_raw_response.create(
        model="routed", messages=[{"role": "user", "content": QUERIES[2]}], user="someone")
    assert raw.headers["x-distill-arm"] in {"teacher", "student"}
    assert float(raw.headers["x-distill-confidence"]) == raw.parse().model_extra["confidence"]


def test_streaming_through_the_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=server + "/v1", api_key=API_KEY)
    for model, choices in (("teacher", TEACHER_CHOICES), ("student", STUDENT_CHOICES)):
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUERIES[3]}],
                                                stream=True, stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        for event in stream:
            if event.usage:
                usage = event.usage
            for choice in event.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) in choices
        assert finish in {"stop", "length"}
        assert usage is not None and usage.completion_tokens >= 1


def student_engine() -> dict:
    from ray import serve

    return serve.get_deployment_handle("student", app_name="distill").info.remote().result(timeout_s=60)


def stream_until_the_engine_holds_it(response) -> tuple[int, int]:
    """Read the stream until the engine reports the request in flight (checked after each piece of content);
    returns (pieces read, unfinished requests then)."""
    pieces = 0
    for line in response.iter_lines():
        assert line != "data: [DONE]", f"the answer ended after {pieces} pieces, before the client went away"
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            pieces += 1
            if (unfinished := student_engine()["unfinished_requests"]) == 1:
                return pieces, unfinished
    raise AssertionError(f"the stream ended without [DONE] after {pieces} pieces")


def test_a_streaming_client_that_disconnects_mid_answer_frees_the_engine_request(server):
    from ray import serve

    replicas = serve.status().applications["distill"].deployments["student"].replica_states
    assert replicas == {"RUNNING": 1}, replicas  # one replica: the handle below asks the one that streams
    before = student_engine()
    assert before["unfinished_requests"] == 0
    # Another task's adapter decodes unguided: an answer of up to 1800 tokens, far more than is read here.
    body = chat("langid-v2", QUERIES[1], max_tokens=1800, stream=True)
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            pieces, unfinished = stream_until_the_engine_holds_it(response)
            assert unfinished == 1  # the engine is generating it
    # The connection is closed mid-answer.
    deadline = time.monotonic() + 30
    while (after := student_engine())["unfinished_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after["unfinished_requests"] == 0, after
    assert after["cancelled_streams"] == before["cancelled_streams"] + 1, after


def test_teacher_reasoning_is_returned_apart_from_the_content(server):
    """The tiny teacher does not think, so the message has no reasoning and the content is the bare label; the
    splitting of real <think> output is covered in test_serve_router.py (both whole and streamed)."""
    r = post(server, "/v1/chat/completions", chat("teacher", QUERIES[4]))
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["content"] in TEACHER_CHOICES
    assert "<think>" not in message["content"] and "reasoning_content" not in message


# -- A/B routing -------------------------------------------------------------------------------------------------
async def _send_all(url: str, bodies: list[dict], concurrency: int, headers=AUTH) -> list[httpx.Response]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        async def one(body):
            async with semaphore:
                return await client.post("/v1/chat/completions", json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_ab_split_lands_within_tolerance_and_is_sticky_per_user(server):
    share = 0.3
    set_share(server, share)
    users = [f"user-{i}" for i in range(300)]
    bodies = [chat("routed", QUERIES[i % len(QUERIES)], user=u, max_tokens=1) for i, u in enumerate(users)]
    responses = asyncio.run(_send_all(server, bodies, concurrency=16))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    arms = [r.headers["x-distill-arm"] for r in responses]
    fraction = arms.count("student") / len(arms)
    # 3 standard deviations of a binomial(300, 0.3) fraction.
    assert abs(fraction - share) < 3 * (share * (1 - share) / len(arms)) ** 0.5, fraction
    # Sticky: the arm is exactly the one the user's hash decides, and it does not change on repeat.
    assert arms == ["student" if user_fraction(u) < share else "teacher" for u in users]
    again = asyncio.run(_send_all(server, bodies[:40], concurrency=8))
    assert [r.headers["x-distill-arm"] for r in again] == arms[:40]
    # The user id may come in a header instead of the body.
    header_user = [httpx.post(server + "/v1/chat/completions", json=chat("routed", QUERIES[0], max_tokens=1),
                              headers={**AUTH, "x-user-id": users[7]}, timeout=60) for _ in range(3)]
    assert {r.headers["x-distill-arm"] for r in header_user} == {arms[7]}
    # Runtime change: share 1.0 sends everyone to the student, 0 everyone to the teacher.
    for share, arm in ((1.0, "student"), (0.0, "teacher")):
        set_share(server, share)
        served = asyncio.run(_send_all(server, bodies[:20], concurrency=8))
        assert {r.headers["x-distill-arm"] for r in served} == {arm}


def drive_to_rollback(url: str, prefix: str) -> tuple[int, dict]:
    """Share 1.0 with every answer shadowed: the student's forced label disagrees with the teacher's every time,
    so the agreement rule rolls back after `min_agreement_samples` comparisons. Returns (rollbacks before, stats)."""
    set_share(url, 1.0, shadow=1.0)
    before = stats(url)["rollbacks"]
    # Small batches, so the shadow requests keep up (more than max_shadow_in_flight at once are skipped).
    current, sent = stats(url), 0
    deadline = time.monotonic() + 180
    while current["rollbacks"] == before and time.monotonic() < deadline:
        bodies = [chat("routed", QUERIES[(sent + i) % len(QUERIES)], user=f"{prefix}-{sent + i}") for i in range(4)]
        responses = asyncio.run(_send_all(url, bodies, concurrency=4))
        sent += len(bodies)
        assert all(r.status_code == 200 for r in responses)
        arms = {r.headers["x-distill-arm"] for r in responses}
        current = stats(url)
        assert arms == {"student"} or current["rollbacks"] > before
        time.sleep(0.3)
        current = stats(url)
    return before, current


def test_rollback_fires_when_the_student_disagrees(server):
    before, current = drive_to_rollback(server, "rollback")
    assert current["rollbacks"] == before + 1, current
    assert current["student_share"] == 0.0
    event = current["events"][-1]
    assert event["kind"] == "rollback" and "live agreement 0.000" in event["reason"], event
    assert (event["rule"], event["value"], event["limit"]) == ("agreement", 0.0, 0.9)
    assert current["agreement"]["shadow"]["disagree"] >= 10
    metrics = httpx.get(server + "/metrics", headers=AUTH, timeout=30).text
    assert f"distill_rollbacks_total {before + 1}" in metrics
    assert "distill_student_share 0.0" in metrics
    bodies = [chat("routed", q, user=f"after-rollback-{i}") for i, q in enumerate(QUERIES)]
    after = asyncio.run(_send_all(server, bodies, concurrency=4))
    assert {r.headers["x-distill-arm"] for r in after} == {"teacher"}


# -- security and bad input -------------------------------------------------------------------------------------
def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = post(server, "/v1/chat/completions", chat("teacher", "hi"), headers=headers)
        assert r.status_code == 401, r.text
        assert "API key" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/models", timeout=30).status_code == 401
    assert post(server, "/admin/share", {"student_share": 1.0}, headers={}).status_code == 401
    assert post(server, "/admin/cascade", {"threshold": 0.5}, headers={}).status_code == 401
    assert httpx.get(server + "/stats", timeout=30).status_code == 401
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server + "/v1", api_key="wrong").models.list()


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps(chat("gpt-4", "hi")).encode(), 404, "does not exist"),
    (json.dumps({"model": "teacher", "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": "teacher"}).encode(), 400, "messages"),
    (json.dumps({"model": "teacher", "messages": [{"role": "user", "content": "   "}]}).encode(), 400, "empty"),
    (json.dumps({"model": "teacher", "messages": [{"role": "assistant", "content": "x"}]}).encode(), 400,
     "last message"),
    (json.dumps({"model": "teacher", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, "role"),
    (json.dumps(chat("teacher", "hi", n=2)).encode(), 400, "n=1"),
    (json.dumps(chat("teacher", "hi", seed=3)).encode(), 400, "seed"),
    (json.dumps(chat("teacher", "hi", temperature=5)).encode(), 400, "temperature"),
    (json.dumps(chat("teacher", "hi", max_tokens=0)).encode(), 400, "max_tokens"),
    (json.dumps(chat("student", "x " * 40_000)).encode(), 413, "exceeds the limit"),
    # Under the byte limit but over the engine's context: refused by the arm with the token counts.
    (json.dumps(chat("student", "Everyone has the right to life. " * 1500)).encode(), 400, "input too long"),
    (json.dumps(chat("teacher", "Everyone has the right to life. " * 1500, stream=True)).encode(), 400,
     "input too long"),
])
def test_bad_input_gets_4xx_with_a_message(server, body, status, message):
    r = httpx.post(server + "/v1/chat/completions", content=body,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"], r.json()


def test_a_client_key_gets_403_on_admin_and_the_event_log_names_the_admin_key(server):
    for path, body in (("/admin/share", {"student_share": 1.0}), ("/admin/cascade", {"threshold": 0.5})):
        r = post(server, path, body)  # the client key
        assert r.status_code == 403, r.text
        assert r.json()["error"]["type"] == "permission_error" and "client key" in r.json()["error"]["message"]
    before = stats(server)
    assert before["auth"] == {"client_key": True, "admin_keys": ["ops"]}
    event = set_share(server, 0.0)["event"]
    assert event["by"] == "admin key 'ops'" and event["reason"] == "test"
    after = stats(server)
    assert after["events"][-1] == event and after["stage"] == before["stage"] + 1


def test_bad_share_changes_are_refused(server):
    for body in ({"student_share": 1.5}, {"student_share": -0.1}, {"share": 0.5}, {"student_share": 0.2,
                                                                                   "shadow_sample_rate": 2}):
        r = post(server, "/admin/share", body, headers=ADMIN)
        assert r.status_code == 400, r.text
    # Cascade mode needs a threshold, and this application was given none.
    r = post(server, "/admin/cascade", {"mode": "cascade"}, headers=ADMIN)
    assert r.status_code == 400 and "needs a threshold" in r.json()["error"]["message"], r.text


def test_replicas_survive_bad_input(server):
    """After all the refused requests above, every arm still answers, and no replica was replaced."""
    from ray import serve

    for model in ("teacher", "student", "routed"):
        assert post(server, "/v1/chat/completions", chat(model, QUERIES[5], max_tokens=4)).status_code == 200
    app = serve.status().applications["distill"]
    for name, deployment in app.deployments.items():
        assert deployment.status == "HEALTHY", (name, deployment)


# -- load --------------------------------------------------------------------------------------------------------
def test_load_300_requests_at_concurrency_16_has_no_5xx(server):
    set_share(server, 0.5, shadow=0.2)
    models = ["teacher", "student", "routed", "routed"]
    bodies = [chat(models[i % 4], QUERIES[i % len(QUERIES)], user=f"load-{i}", max_tokens=2,
                   stream=(i % 5 == 0)) for i in range(320)]
    t0 = time.perf_counter()
    responses = asyncio.run(_send_all(server, bodies, concurrency=16))
    seconds = time.perf_counter() - t0
    codes = Counter(r.status_code for r in responses)
    assert not [c for c in codes if c >= 500], codes
    assert codes == {200: 320}, codes
    for r, body in zip(responses, bodies):
        if body["stream"]:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    current = stats(server)
    print(f"\n320 requests at concurrency 16 in {seconds:.1f}s ({320 / seconds:.1f} req/s)")
    for arm in ("teacher", "student"):
        s = current["arms"][arm]
        assert s["requests"] > 0 and not any(int(code) >= 500 for code in s["errors"])
        # Client-side latency of this test's requests only (/stats also holds the earlier tests' traffic).
        mine = [r.elapsed.total_seconds() for r in responses if r.headers["x-distill-arm"] == arm]
        print(f"{arm}: {len(mine)} requests, client p50 {quantile(mine, 0.5) * 1000:.0f} ms, "
              f"p95 {quantile(mine, 0.95) * 1000:.0f} ms")
    metrics = httpx.get(server + "/metrics", headers=AUTH, timeout=30).text
    assert 'distill_requests_total{arm="teacher"}' in metrics
    assert 'distill_latency_seconds{arm="student",quantile="0.95"}' in metrics


def test_load_500_routed_requests_at_concurrency_16_has_no_5xx_and_bad_requests_get_4xx(server):
    """The routed model under load, with malformed, oversized and keyless requests mixed in: every good request
    answers 200 (no 5xx), every bad one its 4xx, and the client-side p50/p95 are printed (the serving README's
    load figures come from this test). No shadowing: this student disagrees by design and would be rolled back
    half-way, which the rollback tests cover; here the split stays at one half throughout."""
    set_share(server, 0.5, shadow=0.0)
    # (body, headers, expected status; None: a good request)
    items = [(json.dumps(chat("routed", QUERIES[i % len(QUERIES)], user=f"load500-{i}", max_tokens=8,
                              stream=(i % 5 == 0))).encode(), AUTH, None) for i in range(500)]
    bad = [(b'{"model": "routed", "messages": [', AUTH, 400),
           (json.dumps(chat("routed", "x " * 40_000)).encode(), AUTH, 413),
           (json.dumps(chat("routed", "hi")).encode(), {}, 401)] * 10
    for i, item in enumerate(bad):
        items.insert(i * 17, item)
    t0 = time.perf_counter()
    responses = asyncio.run(_send_raw(server, [(body, headers) for body, headers, _ in items], concurrency=16))
    seconds = time.perf_counter() - t0
    good_responses = [r for r, (_, _, status) in zip(responses, items) if status is None]
    assert Counter(r.status_code for r in good_responses) == {200: 500}
    for r, (body, _, status) in zip(responses, items):
        if status is not None:
            assert r.status_code == status and r.json()["error"]["message"], r.text
        elif b'"stream": true' in body:
            assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    latencies = [r.elapsed.total_seconds() for r in good_responses]
    print(f"\nLOAD: 500 routed requests (+{len(bad)} bad ones) at concurrency 16 in {seconds:.1f}s "
          f"({500 / seconds:.1f} req/s); client p50 {quantile(latencies, 0.5) * 1000:.0f} ms, "
          f"p95 {quantile(latencies, 0.95) * 1000:.0f} ms")
    for arm in ("teacher", "student"):
        mine = [r.elapsed.total_seconds() for r in good_responses if r.headers["x-distill-arm"] == arm]
        assert mine, arm
        print(f"LOAD: {arm}: {len(mine)} requests, client p50 {quantile(mine, 0.5) * 1000:.0f} ms, "
              f"p95 {quantile(mine, 0.95) * 1000:.0f} ms")


async def _send_raw(url: str, items: list[tuple[bytes, dict]], concurrency: int) -> list[httpx.Response]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(body, headers):
            async with semaphore:
                return await client.post("/v1/chat/completions", content=body,
                                         headers={**headers, "Content-Type": "application/json"})

        return await asyncio.gather(*(one(b, h) for b, h in items))


def test_compare_latency_against_the_running_server(server, tmp_path):
    from serve.latency import CompareLatencyConfig, main

    report = main(CompareLatencyConfig(url=server, api_key=API_KEY, limit=6, warmup=1, max_tokens=4,
                                       output=str(tmp_path)))
    for model in ("teacher", "student"):
        assert report["summary"][model]["requests"] == 6 and report["summary"][model]["errors"] == 0
        assert report["summary"][model]["p95_s"] >= report["summary"][model]["p50_s"] > 0
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert json.loads((tmp_path / "latency.json").read_text())["summary"]["teacher"]["requests"] == 6
    assert "p95 ms" in report["table"]
    # Each model under its own concurrent load, as bench/serving.py measures at concurrency 16; the gateway's
    # own time per request comes from its x-distill-gateway-ms header.
    loaded = main(CompareLatencyConfig(url=server, api_key=API_KEY, limit=8, warmup=0, max_tokens=4, concurrency=4,
                                       order="separate", output=str(tmp_path / "loaded")))
    for model in ("teacher", "student"):
        summary = loaded["summary"][model]
        assert summary["requests"] == 8 and summary["errors"] == 0
        assert 0 < summary["gateway_ms_p50"] <= summary["gateway_ms_p95"] < 1000 * summary["p50_s"]
    assert loaded["order"] == "separate" and "gateway p50 ms" in loaded["table"]


# -- restarts and chaos ------------------------------------------------------------------------------------------
def live_replicas(deployment: str) -> set[str]:
    """Names of the live replica actors of a deployment of the app."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address,  # this session's cluster, no other
                         filters=[("class_name", "=", f"ServeReplica:distill:{deployment}"), ("state", "=", "ALIVE")])
    return {actor.name for actor in actors}


def kill_replicas(deployment: str) -> set[str]:
    """Kill every live replica actor of a deployment of the app, as a crash would (Serve starts new ones);
    returns the names of the killed actors."""
    import ray

    names = live_replicas(deployment)
    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return names


def saved_stats(url: str) -> dict:
    """/stats once the gateway has saved everything it holds (window updates are saved every 0.5 s here)."""
    deadline = time.monotonic() + 30
    while (current := stats(url))["state"]["saved_revision"] != current["state"]["revision"]:
        assert time.monotonic() < deadline, current["state"]
        time.sleep(0.2)
    return current


def restart_gateway(url: str) -> tuple[dict, dict]:
    """Kill the gateway replica: (/stats just before, /stats from its replacement)."""
    old = saved_stats(url)
    assert len(kill_replicas("gateway")) == 1
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/stats", headers=AUTH, timeout=10)
            if r.status_code == 200 and r.json()["gateway_replica"] != old["gateway_replica"]:
                return old, r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError("no new gateway replica within 120 s")


def test_a_restarted_gateway_keeps_the_rollback_and_the_stage_in_progress(server):
    before, rolled_back = drive_to_rollback(server, "restart")
    assert rolled_back["rollbacks"] == before + 1 and rolled_back["student_share"] == 0.0
    old, new = restart_gateway(server)
    assert new["state"]["resumed"] is True and new["state"]["store"] == "detached Ray actor distill/rollout-state-distill"
    for key in ("student_share", "stage", "rollbacks", "rollbacks_by_rule", "events"):
        assert new[key] == old[key], key
    assert new["student_share"] == 0.0 and new["events"][-1]["kind"] == "rollback"
    served = asyncio.run(_send_all(server, [chat("routed", q, user=f"after-restart-{i}") for i, q in
                                            enumerate(QUERIES)], concurrency=4))
    assert {r.headers["x-distill-arm"] for r in served} == {"teacher"}  # the rollback is still in force

    # A stage in progress keeps its share and its windows.
    set_share(server, 0.4, shadow=0.0)
    bodies = [chat("routed", QUERIES[i % len(QUERIES)], user=f"stage-{i}", max_tokens=4) for i in range(24)]
    assert all(r.status_code == 200 for r in asyncio.run(_send_all(server, bodies, concurrency=4)))
    old, new = restart_gateway(server)
    assert old["rules"]["error_rate"]["samples"] > 0  # the windows hold this stage's routed student requests
    for key in ("student_share", "stage", "rules", "events", "rollbacks"):
        assert new[key] == old[key], key
    assert new["student_share"] == 0.4


def test_killing_the_student_under_load_fails_cleanly_rolls_back_on_errors_and_recovers(server):
    from ray import serve

    set_share(server, 1.0, shadow=0.0)
    before = stats(server)

    async def load_with_a_kill():
        semaphore = asyncio.Semaphore(8)
        # A client timeout well above the gateway's: a request that hung would fail this test, not pass it.
        async with httpx.AsyncClient(base_url=server, headers=AUTH, timeout=REQUEST_TIMEOUT_S + 60) as client:
            async def one(i):
                async with semaphore:
                    started = time.perf_counter()
                    r = await client.post("/v1/chat/completions", json=chat(
                        "routed", QUERIES[i % len(QUERIES)], user=f"chaos-{i}", max_tokens=8))
                    return r, time.perf_counter() - started

            tasks = [asyncio.create_task(one(i)) for i in range(80)]
            while sum(t.done() for t in tasks) < 12:  # a full error window's worth of successes first
                await asyncio.sleep(0.05)
            killed = await asyncio.to_thread(kill_replicas, "student")
            return killed, await asyncio.gather(*tasks)

    t0 = time.perf_counter()
    killed, results = asyncio.run(load_with_a_kill())
    seconds = time.perf_counter() - t0
    assert len(killed) >= 1
    codes = Counter(r.status_code for r, _ in results)
    assert set(codes) <= {200, 503, 504}, codes
    failed = [r for r, _ in results if r.status_code != 200]
    assert failed, codes  # the requests in flight on the killed replica cannot have succeeded
    for r in failed:  # clean failures: an OpenAI error body that says what failed
        assert r.json()["error"]["type"] == "server_error" and "student" in r.json()["error"]["message"], r.text
    assert max(elapsed for _, elapsed in results) < REQUEST_TIMEOUT_S + 30
    after = stats(server)
    assert after["rollbacks"] == before["rollbacks"] + 1 and after["student_share"] == 0.0, after
    event = after["events"][-1]
    assert event["kind"] == "rollback" and event["rule"] == "error_rate" and event["value"] > 0.2, event
    arms = Counter(r.headers.get("x-distill-arm") for r, _ in results if r.status_code == 200)
    assert arms["teacher"] > 0, arms  # after the rollback the routed traffic went to the teacher
    metrics = httpx.get(server + "/metrics", headers=AUTH, timeout=30).text
    assert 'distill_rollback_firings_total{rule="error_rate"} 1' in metrics.splitlines()
    print(f"\nCHAOS: 80 routed requests at concurrency 8, {len(killed)} student replica(s) killed after 12 answers: "
          f"{dict(codes)} in {seconds:.1f}s, slowest {max(e for _, e in results):.1f}s; rollback: {event['reason']}")

    # Serve replaces the replica; the student answers again. The deployment's status can still read HEALTHY from
    # before the kill until the controller notices the death, so wait for a replica that is not a killed one too.
    deadline = time.monotonic() + 300
    while not (live_replicas("student") - killed
               and serve.status().applications["distill"].deployments["student"].status == "HEALTHY"):
        assert time.monotonic() < deadline, serve.status().applications["distill"].deployments["student"]
        time.sleep(2)
    assert post(server, "/v1/chat/completions", chat("student", QUERIES[0], max_tokens=4)).status_code == 200


# -- selective serving: a merged student, the cascade, capture, drift (the application upgraded in place) --------
# The selective student is guided to several labels, so its confidence (the probability of the label it gave,
# among those allowed) varies from query to query.
SELECTIVE_CHOICES = TEACHER_CHOICES + ["Final Answer: ot"]


@pytest.fixture(scope="module")
def selective(server, tiny_model, tmp_path_factory):
    """The running application replaced (`start` on the same Serve instance and port) by one that serves a
    single task adapter, routes everything through the cascade at a first threshold, captures teacher answers
    and watches label drift against a reference in which every label is `ar`, which neither guided model can
    answer. Yields (url, folders)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray import serve

    from serve.app import start

    root = tmp_path_factory.mktemp("selective")
    (root / "reference" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"label": ["ar"] * 50}), root / "reference" / "data" / "part-0.parquet")
    adapter = make_adapter(tiny_model, root / "langid", seed=3)
    config = serve_config(
        tiny_model, int(server.rsplit(":", 1)[1]),
        capture=str(root / "capture"), capture_flush_seconds=0.5,
        student={"model": tiny_model, "guided": True, "guided_choices": SELECTIVE_CHOICES, "temperature": 0.0,
                 "engine": ENGINE, "adapters": {"language-id": adapter}},
        # No agreement rule: these random models disagree, and the kept share's rollback is unit-tested.
        rollout={"mode": "cascade", "cascade": {"threshold": 0.5}, "student_share": 1.0, "shadow_sample_rate": 0.0,
                 "min_agreement": None, "max_student_p95_s": None, "persist_interval_s": 0.5,
                 "drift": {"reference_data": str(root / "reference"), "window": 10, "min_samples": 10}})
    # Deleted first, not upgraded in place: the merge at start-up is a Ray task that needs a CPU the old
    # application's replicas (the student scaled to 2 under the load tests) may still hold.
    serve.delete("distill")
    assert start(config) == server
    yield server, {"adapter": adapter, "capture": root / "capture", "root": root}


def admin_cascade(url: str, **change) -> dict:
    r = post(url, "/admin/cascade", {**change, "reason": "test"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def cascade_all(url: str, texts: list[str], user: str) -> list[httpx.Response]:
    bodies = [chat("routed", t, user=f"{user}-{i}") for i, t in enumerate(texts)]
    responses = asyncio.run(_send_all(url, bodies, concurrency=4))
    assert [r.status_code for r in responses] == [200] * len(texts), [r.text for r in responses][:3]
    return responses


def check_decision(response: httpx.Response, threshold: float) -> bool:
    """The cascade's decision for one answer, checked against what it says: True when the student's answer was
    kept (its confidence at or above the threshold), False when the teacher answered."""
    body = response.json()
    student_confidence = float(response.headers["x-distill-student-confidence"])
    assert body["cascade"]["student_confidence"] == student_confidence
    assert body["cascade"]["threshold"] == threshold
    kept = student_confidence >= threshold
    assert response.headers["x-distill-cascade"] == body["cascade"]["decision"] == ("kept" if kept else "deferred")
    assert response.headers["x-distill-arm"] == body["arm"] == ("student" if kept else "teacher")
    assert body["cascade"]["reason"] == ("confident" if kept else "low_confidence")
    assert float(response.headers["x-distill-confidence"]) == body["confidence"]
    if kept:
        assert body["confidence"] == student_confidence
    assert body["choices"][0]["message"]["content"] in (SELECTIVE_CHOICES if kept else TEACHER_CHOICES)
    return kept


def test_a_single_task_adapter_is_served_merged_on_cpu(selective):
    url, folders = selective
    models = {m["id"]: m["distill"] for m in httpx.get(url + "/v1/models", headers=AUTH, timeout=30).json()["data"]}
    assert set(models) == {"teacher", "student", "routed", "language-id"}
    merged = folders["adapter"] + "-merged"
    for name in ("student", "language-id"):
        facts = models[name]
        assert (facts["serving"], facts["lora"], facts["engine_model"]) == ("merged", False, merged), facts
        assert "no fast LoRA path" in facts["why"] and facts["adapter"] == folders["adapter"]
    assert models["routed"]["mode"] == "cascade" and models["routed"]["threshold"] == 0.5
    engine = student_engine()
    assert (engine["model"], engine["adapters"], engine["lora_enabled"]) == (merged, [], False), engine
    marker = json.loads((folders["root"] / "langid-merged" / "distill_merged.json").read_text())
    serving = stats(url)["student_serving"]
    assert serving["mode"] == "merged" and serving["merged_now"] is True
    assert marker["adapter"] == folders["adapter"] and marker["adapter_sha256"] == serving["adapter_sha256"]
    r = post(url, "/v1/chat/completions", chat("student", QUERIES[0], max_tokens=8))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] in SELECTIVE_CHOICES, r.text
    # A rollout of another student (this adapter) does not resume the old one's state.
    assert stats(url)["state"]["resumed"] is False


def test_the_cascade_sends_low_confidence_requests_to_the_teacher_and_says_so(selective):
    url, _ = selective
    # The student's own confidences on these queries, asked directly (never cascaded).
    direct = [post(url, "/v1/chat/completions", chat("student", q)) for q in QUERIES]
    confidences = sorted(r.json()["confidence"] for r in direct)
    assert len({round(c, 3) for c in confidences}) > 1, confidences
    # A threshold in the widest gap between neighbouring confidences: some queries fall below it, some not.
    gap, i = max((confidences[j + 1] - confidences[j], j) for j in range(len(confidences) - 1))
    threshold = (confidences[i] + confidences[i + 1]) / 2
    change = admin_cascade(url, threshold=threshold)
    assert change["event"]["by"] == "admin key 'ops'" and change["mode"] == "cascade"
    before = stats(url)["cascade"]
    responses = cascade_all(url, QUERIES, "cascade")
    kept = [check_decision(r, threshold) for r in responses]
    assert 0 < sum(kept) < len(kept), kept
    after = stats(url)["cascade"]
    # Every request counted once, as kept or deferred.
    assert after["requests"] - before["requests"] == len(QUERIES)
    assert after["kept"] - before["kept"] == sum(kept)
    assert after["deferred_by_reason"]["low_confidence"] - before["deferred_by_reason"]["low_confidence"] == \
        len(kept) - sum(kept)
    assert after["failed"] == before["failed"] == 0
    assert after["kept"] + after["deferred"] == after["requests"]
    # Streamed, a label task is decided before the first byte: a kept answer is the student's, whole; a deferred
    # one is the teacher's stream.
    for response in (responses[kept.index(True)], responses[kept.index(False)]):
        query = QUERIES[responses.index(response)]
        with httpx.stream("POST", url + "/v1/chat/completions", headers=AUTH, timeout=60,
                          json=chat("routed", query, user="stream", stream=True)) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["x-distill-cascade"] == response.headers["x-distill-cascade"]
            assert streamed.headers["x-distill-arm"] == response.headers["x-distill-arm"]
            events = [json.loads(line[6:]) for line in streamed.iter_lines()
                      if line.startswith("data: {")]
        content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert content == response.json()["choices"][0]["message"]["content"]
        assert events[-1]["choices"][0]["finish_reason"] in {"stop", "length"} and events[-1]["confidence"] > 0
    cost = stats(url)["cost"]
    assert cost["saved_usd"] is not None and cost["student_answered"] >= sum(kept)
    metrics = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text
    assert 'distill_cascade_mode{mode="cascade"} 1' in metrics
    assert f"distill_cascade_threshold {threshold}" in metrics


def test_shadowed_kept_answers_give_the_live_agreement_of_the_kept_share(selective):
    url, _ = selective
    threshold = stats(url)["cascade"]["threshold"]
    set_share(url, 1.0, shadow=1.0)
    before = stats(url)["cascade"]["kept_comparisons"]
    # One at a time, so every kept answer is shadowed (at most max_shadow_in_flight run at once).
    kept = 0
    for i, query in enumerate(QUERIES):
        r = post(url, "/v1/chat/completions", chat("routed", query, user=f"shadow-{i}"))
        assert r.status_code == 200, r.text
        kept += check_decision(r, threshold)
        deadline = time.monotonic() + 30
        while sum(stats(url)["cascade"]["kept_comparisons"].values()) - sum(before.values()) < kept:
            assert time.monotonic() < deadline, "a shadow comparison never arrived"
            time.sleep(0.2)
    assert kept > 0
    current = stats(url)["cascade"]
    judged = sum(current["kept_comparisons"].values()) - sum(before.values())
    assert judged == kept and current["kept_agreement"] is not None
    assert f"distill_cascade_kept_agreement {current['kept_agreement']}" in httpx.get(
        url + "/metrics", headers=AUTH, timeout=30).text
    set_share(url, 1.0, shadow=0.0)


def captured(folder) -> "pa.Table":
    import pyarrow.dataset as ds

    from distill.formats import DATA_SCHEMA

    files = sorted(str(p) for p in (folder / "data").glob("*.parquet"))
    assert files
    table = ds.dataset(files, format="parquet").to_table()
    assert table.schema.equals(DATA_SCHEMA), table.schema
    return table


def test_captured_teacher_answers_hold_each_query_once_and_train_an_adapter(selective, tiny_model, tmp_path):
    """Every teacher answer of the routed model so far (cascade fallbacks, shadow comparisons) and those of a
    threshold of 1 (everything deferred), twice over the same queries: the shards hold each query once, in the
    generation data format, and `distill train` trains on them as they are."""
    import subprocess
    import sys

    from distill.inputs import content_id
    from distill.local_models import sample_data_path

    url, folders = selective
    texts = [json.loads(line)["text"] for line in sample_data_path().read_text().splitlines()[:60:3]]
    admin_cascade(url, threshold=1.0)
    for round_ in range(2):
        for r in cascade_all(url, texts, f"capture-{round_}"):
            assert check_decision(r, 1.0) is False
    deadline = time.monotonic() + 30
    while (snapshot := stats(url)["capture"])["pending"]:
        assert time.monotonic() < deadline, snapshot
        time.sleep(0.2)
    current = stats(url)
    cascade = current["cascade"]
    # Teacher answers this application produced: every deferred request, every shadow comparison.
    teacher_answers = cascade["deferred"] + sum(cascade["kept_comparisons"].values())
    table = captured(folders["capture"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == snapshot["written"] == snapshot["accepted"] == snapshot["queries"]
    assert snapshot["accepted"] + snapshot["skipped"]["duplicate"] == teacher_answers
    # Every query met the teacher: the earlier ones deferred or, when kept, shadowed; these all deferred.
    assert set(ids) == {content_id(t.strip()) for t in texts + QUERIES}
    assert set(table.column("answer").to_pylist()) <= set(TEACHER_CHOICES)
    assert set(table.column("task").to_pylist()) == {"language-id"}
    assert json.loads((folders["capture"] / "manifest.json").read_text())["task"] == "language-id"

    (tmp_path / "train.yaml").write_text(json.dumps({
        "per_device_batch_size": 2, "gradient_accumulation": 1, "max_steps": 2, "eval_every": 1,
        "validation_fraction": 0.25, "test_fraction": 0.0, "select_by": "loss"}))
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--data", str(folders["capture"]),
                           "--output", str(tmp_path / "train"), "--student", tiny_model, "--workers", "1",
                           "--config", str(tmp_path / "train.yaml")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "train" / "adapter" / "adapter_config.json").exists()
    summary = json.loads((tmp_path / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 2, summary


def test_live_labels_far_from_the_training_data_record_a_drift_event(selective):
    url, _ = selective
    current = stats(url)
    labels = current["drift"]["labels"]
    # The reference is all `ar`, a label neither guided model can give: the live labels are far from it.
    assert labels["samples"] == 10 and labels["psi"] > labels["limit"] and labels["alarmed"], labels
    assert "ar" not in labels["live"] and labels["reference"] == {"ar": 1.0}
    events = [e for e in current["events"] if e["kind"] == "drift"]
    assert len(events) == labels["events"] == 1 and "re-distill recommended" in events[0]["reason"], events
    assert current["drift"]["deferral"]["off"] and current["drift"]["deferral"]["psi"] is None
    metrics = httpx.get(url + "/metrics", headers=AUTH, timeout=30).text.splitlines()
    assert 'distill_drift_events_total{signal="labels"} 1' in metrics


def test_a_restarted_gateway_keeps_the_mode_the_threshold_the_counters_and_the_captured_queries(selective):
    url, folders = selective
    old, new = restart_gateway(url)
    assert new["state"]["resumed"] is True
    for key in ("mode", "cascade", "cost", "drift", "student_share", "stage", "events"):
        assert new[key] == old[key], key
    assert new["mode"] == "cascade" and new["cascade"]["threshold"] == 1.0
    assert new["capture"]["on_disk_at_start"] == old["capture"]["written"]
    # A query captured before the restart is not captured again.
    r = cascade_all(url, [QUERIES[0]], "after-restart")[0]
    assert check_decision(r, 1.0) is False
    after = stats(url)
    assert after["capture"]["skipped"]["duplicate"] == 1 and after["capture"]["accepted"] == 0
    assert after["cascade"]["requests"] == old["cascade"]["requests"] + 1
    assert len(captured(folders["capture"])) == old["capture"]["written"]
