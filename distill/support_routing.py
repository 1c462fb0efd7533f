"""The queries of the built-in `support-routing` task (distill/tasks/support-routing.yaml), made deterministically.

Each query is a customer message to a company's help centre about one topic (a parcel, a password, an invoice…)
that names, once, the desk it is meant for. The gold label is that desk, one of eight with made-up names (amber,
birch, …): nothing in a model's pretraining says what they are or how to answer with them. The teacher's prompt
carries the policy: the eight desks, what each handles, that the desk a message names decides, and the answer's
exact form. The student sees the bare message and must answer in that form with no prompt at all.

Why this task and not a look-up: the embedded model, SmolLM2-135M, cannot use a table in its prompt (a topic or a
product routed through an 8-to-24-entry table scored at chance), but it copies a name from the message reliably
once its prompt says what the answer looks like. The probe table is in distill/data/README.md.

    python -m distill.support_routing          # rewrites distill/data/support_routing.jsonl (same bytes)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# desk -> the topics customers write to it about
DESKS: dict[str, tuple[str, ...]] = {
    "amber": ("invoice", "refund", "double charge", "receipt"),
    "birch": ("password", "login", "two-factor code", "locked account"),
    "cedar": ("parcel", "delivery", "courier", "tracking number"),
    "delta": ("printer", "scanner", "toner", "paper jam"),
    "ember": ("laptop", "keyboard", "screen", "charger"),
    "flint": ("contract", "warranty claim", "terms of service", "data request"),
    "grove": ("subscription", "plan upgrade", "cancellation", "renewal date"),
    "haven": ("store visit", "opening hours", "gift card", "loyalty points"),
}

# How a message names its desk: each phrasing holds {desk} once.
MENTIONS = (
    "Please pass this to {desk}.",
    "This is for the {desk} desk.",
    "Sending this to {desk} as the website says.",
    "I was told {desk} handles this.",
    "Forwarding to {desk}, thanks.",
    "Could {desk} take a look?",
)

BODIES = (
    "My {topic} has a problem and I need help.",
    "I have a question about the {topic} from last week.",
    "Nobody has answered me about the {topic} yet.",
    "Something is wrong with my {topic} again.",
    "Can someone check the {topic} for order {order}?",
    "Hello, it is {name}. The {topic} is still not sorted.",
    "The {topic} issue is blocking me, order {order}.",
    "Hi, {name} here: I need an update on the {topic}.",
)

NAMES = ("Ana", "Bilal", "Chen", "Dora", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jin", "Kofi", "Lena", "Mateo",
         "Nour", "Oskar", "Priya")

SAMPLE = Path(__file__).parent / "data" / "support_routing.jsonl"


def build_rows(n: int = 800, seed: int = 0) -> list[dict]:
    """`n` messages, desks in turn (so every label has n/8 rows), topic, body and phrasing drawn from a seeded
    generator: the same rows on every machine and Python version."""
    rng = random.Random(seed)
    desks = list(DESKS)
    rows = []
    for i in range(n):
        desk = desks[i % len(desks)]
        body = rng.choice(BODIES).format(topic=rng.choice(DESKS[desk]), order=rng.randrange(10000, 99999),
                                         name=rng.choice(NAMES))
        # The desk is named at the end: named first, SmolLM2 routed 79 % of 96 messages right, named last 87-92 %.
        text = f"{body} {rng.choice(MENTIONS).format(desk=desk)}"
        rows.append({"id": f"route-{i:04d}", "text": text, "label": desk})
    return rows


def sample_lines(n: int = 800, seed: int = 0) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build_rows(n, seed))


if __name__ == "__main__":
    SAMPLE.write_text(sample_lines(), encoding="utf-8")
    print(f"wrote {SAMPLE}")
