"""The one definition of "the student agrees with its teacher", used by the evaluation report and by the serving
router's shadow comparisons (so the number a rollout rolls back on is the number the report showed).

- Both answers are read the way the task reads a teacher: reasoning stripped, then parsed (`TaskSpec.parse`).
- Label tasks: agree when the labels are equal. A student answer that does not parse disagrees.
- Free text: agreement is exact equality after `normalize` (rarely true of two good paraphrases), and
  `similarity` is ROUGE-L F1 over word tokens — the measure free-text rollouts and reports judge by.
- When the teacher's own answer cannot be used (no parseable label, empty text), the comparison is *unjudged*
  (`agree is None`): it says nothing about the student and counts neither way; counts of unjudged comparisons
  are reported beside every agreement rate.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Optional

from distill.metrics import rouge_l
from distill.tasks import TaskSpec

_PUNCT_EDGES = re.compile(r"^[\W_]+|[\W_]+$", re.UNICODE)


def normalize(text: Optional[str]) -> str:
    """Comparison key of a free-text answer: Unicode NFKC, case-folded, whitespace collapsed, punctuation at the
    edges dropped ("Ahoy, matey!" and "ahoy,   MATEY" are the same answer)."""
    text = unicodedata.normalize("NFKC", text or "").casefold()
    return _PUNCT_EDGES.sub("", " ".join(text.split()))


@dataclass(frozen=True)
class Comparison:
    agree: Optional[bool]          # None: unjudged (the teacher's answer is unusable)
    similarity: Optional[float]    # free text: ROUGE-L F1 of the normalised answers; labels: 1.0 / 0.0 / None
    teacher: Optional[str]         # the teacher's label (label tasks) or normalised answer
    student: Optional[str]


def compare(task: TaskSpec, teacher_output: Optional[str], student_output: Optional[str]) -> Comparison:
    """Compare two raw outputs (reasoning, if any, is stripped by the task's parser)."""
    teacher = task.parse(teacher_output or "")
    student = task.parse(student_output or "")
    if task.answer.type == "labels":
        t_label, s_label = task.label_of(teacher.answer), task.label_of(student.answer)
        if t_label is None:
            return Comparison(None, None, None, s_label)
        agree = s_label == t_label
        return Comparison(agree, float(agree), t_label, s_label)
    t_key = normalize(teacher.answer) if teacher.answer is not None else ""
    if not t_key:
        return Comparison(None, None, None, normalize(student.visible))
    s_key = normalize(student.answer) if student.answer is not None else ""
    return Comparison(s_key == t_key, rouge_l(s_key, t_key), t_key, s_key)


def agreement_rate(comparisons: Iterable[Comparison]) -> dict:
    """{rate (agree / judged, None when nothing was judged), agree, judged, unjudged}."""
    comparisons = list(comparisons)
    judged = [c for c in comparisons if c.agree is not None]
    agree = sum(bool(c.agree) for c in judged)
    return {"rate": agree / len(judged) if judged else None, "agree": agree, "judged": len(judged),
            "unjudged": len(comparisons) - len(judged)}


def mean_similarity(comparisons: Iterable[Comparison]) -> Optional[float]:
    values = [c.similarity for c in comparisons if c.similarity is not None]
    return sum(values) / len(values) if values else None
