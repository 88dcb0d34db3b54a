"""Which students one `rebase serve` holds and how they share memory, without Ray: the names clients send,
each student's task and prompt format, and the models to load.

`--model` may be given several times, and a directory that is no student but holds students (a `rebase run`
output's parent, say) stands for each of them. LoRA students keep their adapter (`adapter/`, with the base it
was trained on in stats.json); two or more of the same base share one copy of it in memory, each request
decoded with its student's adapter. A lone LoRA student, and a fully fine-tuned one, load their merged model.
`base` pins the base every LoRA student must share: one trained from another base is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rebase.config import ServeConfig
from rebase.errors import RebaseError
from rebase.models import canonical_model_name, student_stats
from rebase.task import TaskSpec, load_task

__all__ = ["Group", "Student", "groups", "served_name", "students"]


@dataclass(frozen=True)
class Student:
    """One model as clients see it: its name, its task (for the task routes) and where its weights are."""

    name: str
    model: str  # canonical: the student's directory, a built-in or an HF id
    task: TaskSpec | None = None
    few_shot: bool = False
    base: str | None = None  # LoRA students: the base the adapter was trained on (canonical)
    adapter: str | None = None  # LoRA students: the adapter's directory


@dataclass(frozen=True)
class Group:
    """One model in memory: a student's own model, or a base with the adapters of the students sharing it."""

    model: str
    students: list[str]  # the names of the students it serves
    adapters: dict[str, str] = field(default_factory=dict)  # student name -> adapter directory; {}: its own model


def served_name(config: ServeConfig, model: str | None = None) -> str:
    """The name clients send for a model: the configured name, else a directory's name, else the model."""
    model = model or config.model[0]
    if config.name:
        return config.name
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def _is_student(path: Path) -> bool:
    return bool(student_stats(path))


def _expanded(models: list[str]) -> list[str]:
    """Each model as given, a directory of students replaced by the students in it (sorted)."""
    found = []
    for model in models:
        path = Path(model).expanduser()
        if path.is_dir() and not _is_student(path) and not (path / "config.json").is_file():
            inside = sorted(str(child) for child in path.iterdir() if child.is_dir() and _is_student(child))
            if not inside:
                raise RebaseError(f"{model} is neither a model nor a directory of students (none found in it)")
            found.extend(inside)
        else:
            found.append(model)
    return found


def students(config: ServeConfig) -> list[Student]:
    """The students `config` serves, each with its name, task and (LoRA) adapter; bad combinations are one
    RebaseError: a name given for several, two students of one name, a task file for several."""
    models = _expanded(config.model)
    several = len(models) > 1
    if several and config.name:
        raise RebaseError("--name names one model; with several, each is served under its directory's name")
    if several and config.task is not None:
        raise RebaseError("--task is for one model; with several, each student's task is the one it was trained for")
    made: dict[str, Student] = {}
    for model in models:
        student = _student(config, model)
        if student.name in made:
            raise RebaseError(
                f"two students are named {student.name!r} ({made[student.name].model} and {student.model}); "
                "serve them from directories of different names"
            )
        made[student.name] = student
    return list(made.values())


def _student(config: ServeConfig, model: str) -> Student:
    stats = student_stats(model)
    trained = stats.get("config", {})
    few_shot = bool(config.few_shot if config.few_shot is not None else trained.get("few_shot"))
    directory = Path(model).expanduser()
    task = None
    if config.task is not None:
        task = load_task(config.task)
    elif (directory / "task.yaml").is_file():
        task = load_task(directory / "task.yaml")
    adapter = directory / stats["adapter"] if stats.get("adapter") else None
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise RebaseError(f"{model}: its adapter ({adapter}) is missing or incomplete; train it again")
    return Student(
        name=served_name(config, model),
        model=canonical_model_name(model),
        task=task,
        few_shot=few_shot,
        base=stats.get("base") if adapter is not None else None,
        adapter=str(adapter.resolve()) if adapter is not None else None,
    )


def groups(served: list[Student], base: str | None = None) -> list[Group]:
    """The models to load: LoRA students of one base share it (two or more, or all when `base` is given);
    every other student loads its own model. A LoRA student of another base than `base` is refused."""
    pinned = canonical_model_name(base) if base else None
    if pinned is not None:
        strangers = [s for s in served if s.adapter is not None and s.base != pinned]
        if strangers:
            raise RebaseError(
                f"student {strangers[0].name!r} was trained from {strangers[0].base}, not from the base {pinned} "
                "that the students are to share; serve it without --base, or beside students of its own base"
            )
    by_base: dict[str, list[Student]] = {}
    for student in served:
        if student.adapter is not None:
            by_base.setdefault(student.base or "", []).append(student)
    loaded = []
    for student in served:
        sharing = by_base.get(student.base or "", []) if student.adapter is not None else []
        if len(sharing) > 1 or (sharing and pinned is not None):
            if student is sharing[0]:  # the group, once, where its first student stands
                names = [s.name for s in sharing]
                loaded.append(Group(student.base or "", names, {s.name: s.adapter for s in sharing}))
        else:
            loaded.append(Group(student.model, [student.name]))
    return loaded
