"""Task specs: what the teacher is told, what it must answer, and what the student learns.

A task is a YAML file (see `distill/tasks/*.yaml` for the built-in ones). Users add their own with a YAML file and
no code: `--task path/to/task.yaml`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from distill.chat import THINK_CLOSE, THINK_OPEN, opens_reasoning
from distill.config import ConfigError, StrictModel, build_config, read_yaml

BUILTIN_DIR = Path(__file__).parent / "tasks"
QUERY_SLOT = "{query}"


class PromptSpec(StrictModel):
    system: Optional[str] = Field(None, description="System message of the teacher (the long task prompt).")
    user: str = Field(QUERY_SLOT, description="User message template; must contain the query slot {query}.")

    @field_validator("user")
    @classmethod
    def _has_slot(cls, v: str) -> str:
        if v.count(QUERY_SLOT) != 1:
            raise ValueError(f"must contain the query slot {QUERY_SLOT} exactly once")
        return v

    @field_validator("system")
    @classmethod
    def _no_slot(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and QUERY_SLOT in v:
            raise ValueError(f"the query slot {QUERY_SLOT} belongs in the user template, not the system prompt")
        return v


class AnswerSpec(StrictModel):
    type: Literal["labels", "free_text"] = Field(description="A closed label set with a parser, or free text.")
    labels: Optional[list[str]] = Field(None, description="The label set (type: labels).")
    pattern: Optional[str] = Field(
        None, description="Regex with one capture group that extracts the label from the answer (type: labels)."
    )
    template: str = Field("{label}", description="Canonical answer text the student learns; contains {label}.")
    min_chars: int = Field(1, ge=1, description="Free-text answers shorter than this are rejected.")

    @model_validator(mode="after")
    def _check(self) -> "AnswerSpec":
        if self.type == "labels":
            if not self.labels:
                raise ValueError("labels: a non-empty label set is required when type is 'labels'")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels: duplicate labels")
            if self.pattern is None:
                raise ValueError("pattern: a regex with one capture group is required when type is 'labels'")
            try:
                compiled = re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern: not a valid regex: {err}") from None
            if compiled.groups != 1:
                raise ValueError(f"pattern: needs exactly one capture group, has {compiled.groups}")
            if "{label}" not in self.template:
                raise ValueError("template: must contain {label}")
            for label in self.labels:
                rendered = self.template.format(label=label)
                m = compiled.search(rendered)
                if not m or m.group(1) != label:
                    raise ValueError(f"pattern does not parse the template's own answer {rendered!r}")
        elif self.labels:
            raise ValueError("labels: only allowed when type is 'labels'")
        return self


class TeacherSpec(StrictModel):
    temperature: float = Field(0.15, ge=0.0, le=2.0, description="Teacher sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Teacher nucleus sampling.")
    max_tokens: int = Field(256, ge=1, description="Most tokens of the teacher's answer (after its reasoning, "
                            "for a teacher that thinks).")
    reasoning_tokens: int = Field(
        0, ge=0, description="Most tokens a thinking teacher may reason before its answer (Qwen3-Thinking-2507: "
        "thousands). The engine's budget is reasoning_tokens + max_tokens; a reasoning still open when it runs out "
        "is unfinished, never an answer. Required (> 0) when thinks is true or the teacher's template opens the "
        "think block itself.")
    thinks: bool = Field(False, description="The teacher reasons in <think>...</think> before answering.")
    constrained: bool = Field(
        False, description="Constrain the teacher's decoding to the canonical answers of the label set."
    )


@dataclass(frozen=True)
class ParsedAnswer:
    """One teacher output taken apart. `answer` is None when it could not be used; `reason` says why."""

    raw: str
    reasoning: Optional[str]
    visible: str
    answer: Optional[str]
    reason: Optional[str]




def split_reasoning(raw: str) -> tuple[Optional[str], str, bool]:
    """Split a teacher output into (reasoning, visible answer, finished).

    Handles `<think>...</think>answer`, and the Qwen3-Thinking style where the chat template already opened the
    think block, so the engine's text holds only `...</think>answer`: pass it through distill.chat.teacher_output,
    which puts back the opening tag. `finished` is False when a think block was opened and never closed (the
    teacher ran out of tokens while thinking): then there is no answer, whatever the reasoning says.
    """
    if THINK_CLOSE in raw:
        head, _, tail = raw.rpartition(THINK_CLOSE)
        reasoning = head.split(THINK_OPEN, 1)[-1].strip()
        return reasoning, tail.strip(), True
    if THINK_OPEN in raw:
        return raw.split(THINK_OPEN, 1)[1].strip(), "", False
    return None, raw.strip(), True


class TaskSpec(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Task name (used in outputs).")
    description: str = Field("", description="One line on what the task is.")
    prompt: PromptSpec = Field(description="The teacher's prompt; the student never sees it.")
    answer: AnswerSpec = Field(description="What a valid answer looks like.")
    teacher: TeacherSpec = Field(default_factory=TeacherSpec, description="Teacher sampling defaults.")

    @model_validator(mode="after")
    def _check(self) -> "TaskSpec":
        if self.teacher.constrained and self.answer.type != "labels":
            raise ValueError("teacher.constrained: only possible with a label set (answer.type: labels)")
        if self.teacher.constrained and self.teacher.thinks:
            raise ValueError(
                "teacher.constrained: cannot be combined with teacher.thinks (constrained decoding would forbid "
                "the reasoning); rely on the parser and retries for thinking teachers"
            )
        if self.teacher.thinks and self.teacher.reasoning_tokens == 0:
            raise ValueError("teacher.thinks: a thinking teacher needs a reasoning budget (teacher.reasoning_tokens "
                             "> 0; the answer's own budget is teacher.max_tokens)")
        return self

    # -- what each model sees -------------------------------------------------------------------------------
    def teacher_messages(self, query: str) -> list[dict[str, str]]:
        """The teacher's conversation: the long prompt plus the query."""
        messages = []
        if self.prompt.system:
            messages.append({"role": "system", "content": self.prompt.system})
        messages.append({"role": "user", "content": self.prompt.user.replace(QUERY_SLOT, query)})
        return messages

    def teacher_template_kwargs(self) -> dict:
        """What the teacher's chat template is rendered with: hybrid-thinking templates (Qwen3) read
        enable_thinking, other templates ignore it."""
        return {"enable_thinking": self.teacher.thinks}

    def teacher_opens_reasoning(self, tokenizer, teacher: str = "the teacher") -> bool:
        """Does the teacher's template (its `tokenizer`'s) open the think block itself (Thinking-2507)? Its output
        is then read behind that tag (distill.chat.teacher_output). Such a teacher must be given a reasoning
        budget and cannot be constrained to the answers: a ConfigError says so (`teacher` names it), before any
        engine starts."""
        opened = opens_reasoning(tokenizer, self.teacher_messages("?"), self.teacher_template_kwargs())
        if opened and self.teacher.constrained:
            raise ConfigError(
                f"task {self.name!r} constrains the teacher to its answers (teacher.constrained), but the chat "
                f"template of {teacher} opens a think block: the answer would be forced inside the reasoning, "
                "which never closes. Use a task with teacher.thinks: true and constrained: false (for example "
                "configs/tasks/language-id-thinking.yaml)")
        if opened and self.teacher.reasoning_tokens == 0:
            raise ConfigError(
                f"the chat template of {teacher} opens a think block, but task {self.name!r} gives the teacher no "
                f"reasoning budget (teacher.reasoning_tokens: 0): its teacher.max_tokens="
                f"{self.teacher.max_tokens} would be spent reasoning and no answer written. Set "
                "teacher.reasoning_tokens (and thinks: true), as configs/tasks/language-id-thinking.yaml does")
        return opened

    def teacher_budget(self) -> int:
        """The teacher engine's max_tokens: the reasoning budget plus the answer's."""
        return self.teacher.reasoning_tokens + self.teacher.max_tokens

    def with_teacher_budgets(self, max_tokens: Optional[int] = None,
                             reasoning_tokens: Optional[int] = None) -> "TaskSpec":
        """This task with a run's overrides of the teacher's budgets (None: the task's), checked as the task is."""
        update = {k: v for k, v in (("max_tokens", max_tokens), ("reasoning_tokens", reasoning_tokens))
                  if v is not None}
        if not update:
            return self
        try:
            return TaskSpec.model_validate({**self.model_dump(), "teacher": {**self.teacher.model_dump(), **update}})
        except ValueError as err:
            raise ConfigError(f"task {self.name!r} with {update}: {err}") from None

    @staticmethod
    def student_messages(query: str, answer: Optional[str] = None) -> list[dict[str, str]]:
        """The student's conversation: the bare query, no prompt at all (plus the answer when training)."""
        messages = [{"role": "user", "content": query}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def canonical_answers(self) -> Optional[list[str]]:
        if self.answer.type != "labels":
            return None
        return [self.answer.template.format(label=label) for label in self.answer.labels]

    @staticmethod
    def choice_budget(choices: list[str]) -> int:
        """max_tokens that fits any of `choices` however a constrained model spells it. Counted in bytes, not in
        the tokenizer's usual tokens: under the grammar a weak model may write an allowed answer a few characters
        per token (SmolLM2 took 13 tokens for "Final Answer: ru"); decoding stops once an answer is complete, so
        the spare budget costs nothing."""
        return max(len(c.encode("utf-8")) for c in choices) + 2

    # -- reading the teacher ------------------------------------------------------------------------------
    def parse(self, raw: str) -> ParsedAnswer:
        reasoning, visible, finished = split_reasoning(raw)
        if not finished:
            return ParsedAnswer(raw, reasoning, visible, None, "reasoning not finished (raise teacher.reasoning_tokens)")
        if self.answer.type == "free_text":
            if len(visible) < self.answer.min_chars:
                return ParsedAnswer(raw, reasoning, visible, None, f"answer shorter than {self.answer.min_chars} chars")
            return ParsedAnswer(raw, reasoning, visible, visible, None)
        m = re.search(self.answer.pattern, visible)
        if not m:
            return ParsedAnswer(raw, reasoning, visible, None, "no answer matching the task pattern")
        label = m.group(1)
        if label not in self.answer.labels:
            return ParsedAnswer(raw, reasoning, visible, None, f"label {label!r} not in the label set")
        return ParsedAnswer(raw, reasoning, visible, self.answer.template.format(label=label), None)

    def label_of(self, answer: Optional[str]) -> Optional[str]:
        """The label inside a canonical (or any parseable) answer, for label tasks; None if there is none."""
        if self.answer.type != "labels" or not answer:
            return None
        m = re.search(self.answer.pattern, answer)
        return m.group(1) if m and m.group(1) in self.answer.labels else None


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_task(name_or_path: str) -> TaskSpec:
    """Load a built-in task by name (`language-id`, `persona`) or a user's task from a YAML path."""
    path = Path(name_or_path)
    if not (path.suffix in {".yaml", ".yml"} or path.exists()):
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown task {name_or_path!r}: not a file, and not a built-in task ({', '.join(builtin_tasks())})"
            )
    return build_config(TaskSpec, read_yaml(path), str(path))


def task_of_data(data: str) -> Optional[TaskSpec]:
    """The task a generation output was made with: the whole spec its manifest records (a user's task file need
    not exist where training runs), else the built-in task its rows name; None when neither is known."""
    from distill.storage import join, read_columns, read_json

    manifest = read_json(join(data, "manifest.json")) or {}
    if manifest.get("task_spec"):
        return TaskSpec.model_validate(manifest["task_spec"])
    names = {n for n in read_columns(join(data, "data"), ["task"]).column("task").to_pylist() if n}
    if len(names) == 1 and next(iter(names)) in builtin_tasks():
        return load_task(next(iter(names)))
    return None
