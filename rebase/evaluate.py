"""`rebase evaluate`: a model answers held-out examples (Ray actors, batched) and is scored, optionally
beside baselines on the same examples: with `--compare base`, the student's base in the student's prompt
and with the task's few-shot examples, and for label tasks the majority label of the sample. Each score
carries a 95% interval, and the model's margin over the best baseline carries a paired one.

Metrics are plain functions, against every answer an example accepts (BIG-bench's target lists):
- exact match after SQuAD-style normalisation (lower case, no punctuation, no articles, single spaces);
- accuracy against the task's labels, on the final answer (the text after the last "the answer is" for
  chain-of-thought outputs, else the first line), or the label that answer starts with ("Yes, because");
- SQuAD-style token F1 for extractive QA, the best over the references.

The output directory holds `answers/<model>/part-*.parquet` (raw answers, so a re-run only generates what
is missing), `predictions.parquet` (one row per model and example), `stats.json` and `_SUCCESS`.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from rebase import precision
from rebase.config import EvaluateConfig
from rebase.errors import RebaseError
from rebase.intervals import paired_margin, score_interval
from rebase.io import write_parquet_atomic
from rebase.models import student_stats
from rebase.stage import StageDir, read_stats
from rebase.task import STUDENT_STOP, TaskSpec, final_answer, load_task, match_label, normalise, student_prompt

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, whitespace collapsed."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the prediction's final answer equals any reference's after normalisation."""
    answer = normalise_answer(final_answer(prediction))
    return float(any(answer == normalise_answer(final_answer(ref)) for ref in references))


def token_f1(prediction: str, references: list[str]) -> float:
    """SQuAD F1: token overlap of the prediction's final answer with the best-matching reference."""
    predicted = normalise_answer(final_answer(prediction)).split()
    best = 0.0
    for reference in references:
        expected = normalise_answer(final_answer(reference)).split()
        if not predicted or not expected:
            best = max(best, float(predicted == expected))
            continue
        common = sum((Counter(predicted) & Counter(expected)).values())
        if common:
            precision, recall = common / len(predicted), common / len(expected)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def predicted_label(prediction: str, labels: list[str]) -> str | None:
    """The label an output gives: its final answer ("... the answer is X"), else its first line, else the
    label its final answer starts with ("the answer is Yes, because ...", or "Yes, because ..." with no
    "the answer is"); None when it gives none."""
    answer = final_answer(prediction)
    lines = prediction.strip().splitlines()
    for candidate in (answer, lines[0] if lines else ""):
        label = match_label(candidate, labels)
        if label is not None:
            return label
    words = normalise(answer).split()
    longest_first = sorted(labels, key=lambda label: -len(normalise(label).split()))
    return next(
        (label for label in longest_first if words[: len(normalise(label).split())] == normalise(label).split()), None
    )


def label_correct(prediction: str, references: list[str], labels: list[str]) -> float:
    """1.0 when the prediction names the label of one of the references."""
    predicted = predicted_label(prediction, labels)
    return float(predicted is not None and any(predicted == match_label(final_answer(r), labels) for r in references))


def example_scores(task: TaskSpec, predictions: list[str], references: list[list[str]]) -> dict[str, list[float]]:
    """Each metric per example: exact match always, accuracy on labels when the task has labels, F1 when
    it has none (free-text answers such as extractive QA)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one list of references per prediction, and at least one prediction")
    pairs = list(zip(predictions, references))
    metrics = {"exact_match": [exact_match(p, r) for p, r in pairs]}
    if task.labels:
        metrics["accuracy"] = [label_correct(p, r, task.labels) for p, r in pairs]
    else:
        metrics["f1"] = [token_f1(p, r) for p, r in pairs]
    return metrics


def score(task: TaskSpec, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean metrics over examples (see `example_scores`)."""
    per_example = example_scores(task, predictions, references)
    return {name: round(sum(values) / len(values), 4) for name, values in per_example.items()}


def primary_metric(task: TaskSpec) -> str:
    """The metric a margin is stated in: accuracy for label tasks, F1 otherwise."""
    return "accuracy" if task.labels else "f1"


def majority_label(task: TaskSpec, examples: list[dict]) -> str | None:
    """The label most references of the sample name (ties: the task's first); None without labels."""
    if not task.labels:
        return None
    counts = Counter(match_label(final_answer(e["references"][0]), task.labels) for e in examples)
    counts.pop(None, None)
    return max(task.labels, key=lambda label: counts[label]) if counts else None


@dataclass(frozen=True)
class Margin:
    """The evaluated model's primary metric minus the best baseline's, on the same examples, with its
    paired 95% bootstrap interval."""

    metric: str
    over: str  # the best baseline's name
    role: str
    value: float
    low: float
    high: float

    def text(self) -> str:
        return f"{self.value:+.3f} {self.metric} over {self.role} (95% {self.low:+.3f} to {self.high:+.3f})"


def best_margin(metric: str, per_example: dict[str, dict[str, list[float]]], roles: dict[str, str]) -> Margin | None:
    """The margin of the one evaluated model (role student or model) over the best-scoring baseline."""
    evaluated = [name for name, role in roles.items() if role in ("student", "model")]
    baselines = [name for name in roles if name not in evaluated]
    if len(evaluated) != 1 or not baselines:
        return None
    mean = {name: sum(per_example[name][metric]) / len(per_example[name][metric]) for name in roles}
    best = max(baselines, key=lambda name: mean[name])
    value, low, high = paired_margin(per_example[evaluated[0]][metric], per_example[best][metric])
    return Margin(metric, best, roles[best], value, low, high)


# ---------------------------------------------------------------- the evaluation stage

_OWN_FILES = frozenset({"answers", "predictions.parquet", "stats.json", "_SUCCESS"})


def read_eval_set(spec: str, task: TaskSpec, limit: int | None = None) -> list[dict]:
    """Held-out examples {input, reference} from a datastore SPEC (bigbench:task, files:..., hf:...); the
    source's answers mapped to the task's labels (`eval_answers`); `limit` takes a fixed sample."""
    from rebase.datastore.sources import open_source

    seen: dict[str, dict] = {}
    for dataset in open_source(spec).datasets():
        for _, number, row, _ in dataset.read(list(range(sum(dataset.count())))):
            text = str((row or {}).get("input") or "").strip()
            answers = dataset.references[number] if dataset.references else _answers((row or {}).get("output"))
            answers = [task.eval_answers.get(answer, answer) for answer in answers]
            if text and answers:
                seen.setdefault(text, {"input": text, "reference": answers[0], "references": answers})
    if not seen:
        raise RebaseError(f"{spec} has no rows with an input and an output to evaluate on (fields 'input', 'output')")
    if limit and limit > len(seen):
        raise RebaseError(f"{spec} has {len(seen)} examples to evaluate on; --limit {limit} asks for more")
    examples = sorted(seen.values(), key=lambda e: hashlib.sha256(e["input"].encode()).hexdigest())
    return examples[:limit] if limit else examples


def _answers(output) -> list[str]:
    """A row's acceptable answers: its output, or each item of an output that is a list."""
    values = output if isinstance(output, list) else [output]
    return [str(value).strip() for value in values if value is not None and str(value).strip()]


@dataclass
class EvaluateSummary:
    out: Path
    data: str
    examples: int
    models: dict[str, dict[str, float]]  # name -> metric -> mean, for the model and each baseline
    roles: dict[str, str]  # name -> student, model, base, base few-shot, compare or majority
    seconds: float
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    margin: Margin | None = None

    def table(self) -> str:
        metrics = sorted({name for scores in self.models.values() for name in scores})
        width = max(len(f"{m} ({self.roles[m]})") for m in self.models) + 2
        lines = [f"{'model':<{width}}" + "".join(f"{name + ' (95%)':>26}" for name in metrics)]
        for model, scores in self.models.items():
            label = f"{model} ({self.roles[model]})"
            cells = []
            for name in metrics:
                low, high = self.intervals.get(model, {}).get(name, (float("nan"), float("nan")))
                cells.append(f"{scores.get(name, float('nan')):.3f} ({low:.3f}-{high:.3f})")
            lines.append(f"{label:<{width}}" + "".join(f"{cell:>26}" for cell in cells))
        if self.margin:
            lines.append(f"margin over the best baseline: {self.margin.text()}")
        return "\n".join(lines)

    def line(self) -> str:
        scores = "; ".join(
            f"{model}: " + ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
            for model, metrics in self.models.items()
        )
        margin = f"; margin {self.margin.text()}" if self.margin else ""
        where = f"{self.examples} examples of {self.data}"
        return f"evaluated on {where}: {scores}{margin}; {self.seconds:.0f} s -> {self.out}"


@dataclass(frozen=True)
class _Run:
    """One model scored: its name in stats.json, the model, whether its prompts show the task's examples."""

    name: str
    model: str
    few_shot: bool
    role: str


def _runs(config: EvaluateConfig, trained: dict, few_shot: bool) -> list[_Run]:
    """The model under evaluation, then what `--compare` asks for: `base` is the student's base in the
    student's prompt and with the task's few-shot examples (one run when the student's prompt has them)."""
    runs = [_Run(config.model, config.model, few_shot, "student" if trained else "model")]
    if not config.compare:
        return runs
    if config.compare == "base" and not trained:
        raise RebaseError(f"--compare base needs a student made by rebase train; {config.model} is not one")
    other = trained["summary"]["student"] if config.compare == "base" else config.compare
    if other == config.model:
        raise RebaseError(f"--compare names the model under evaluation ({other}); name another")
    if config.compare != "base":
        return runs + [_Run(other, other, few_shot, "base" if trained else "compare")]
    if few_shot:
        return runs + [_Run(other, other, True, "base few-shot")]
    return runs + [_Run(other, other, False, "base"), _Run(f"{other} (few-shot)", other, True, "base few-shot")]


def evaluate(config: EvaluateConfig) -> EvaluateSummary:
    """Score the model and its baselines on held-out data; answers are cached, so a re-run resumes."""
    started = time.monotonic()
    task = load_task(config.task)
    spec = config.data or task.eval
    if not spec:
        raise RebaseError(f"task '{task.name}' names no eval source; pass --data SPEC (bigbench:T, files:PATH, hf:ID)")
    trained = student_stats(config.model)
    few_shot = config.few_shot if config.few_shot is not None else bool(trained.get("config", {}).get("few_shot"))
    runs = _runs(config, trained, few_shot)
    out = config.out
    settings = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "stop": STUDENT_STOP}
    settings |= precision.hashed(config.dtype, config.engine)
    fingerprint = _fingerprint(config, task, spec, runs, settings)
    stage = StageDir(out, "a rebase evaluation", _OWN_FILES)
    _refuse_other_evaluation(stage, fingerprint, task, spec, runs)
    with stage.writing():
        examples = read_eval_set(spec, task, config.limit)
        print(f"evaluate: {len(examples)} examples of {spec}, {len(runs)} model run(s)", file=sys.stderr)
        predictions = {run.name: _predictions(config, task, run, examples, settings) for run in runs}
        roles = {run.name: run.role for run in runs}
        majority = majority_label(task, examples)
        if majority is not None:
            predictions[f"majority label ({majority})"] = [majority] * len(examples)
            roles[f"majority label ({majority})"] = "majority"
        references = [example["references"] for example in examples]
        per_example = {name: example_scores(task, texts, references) for name, texts in predictions.items()}
        scores = {
            name: {m: round(sum(v) / len(v), 4) for m, v in metrics.items()} for name, metrics in per_example.items()
        }
        intervals = {name: {m: score_interval(v) for m, v in metrics.items()} for name, metrics in per_example.items()}
        margin = best_margin(primary_metric(task), per_example, roles)
        stage.begin("")
        rows = [
            _prediction_row(task, name, roles[name], example, text, per_example[name], i)
            for name, texts in predictions.items()
            for i, (example, text) in enumerate(zip(examples, texts))
        ]
        write_parquet_atomic(out / "predictions.parquet", pa.Table.from_pylist(rows))
        summary = EvaluateSummary(
            out, spec, len(examples), scores, roles, time.monotonic() - started, intervals, margin
        )
        stage.finish(
            {
                "task": task.name,
                "data": spec,
                "fingerprint": fingerprint,
                "examples": len(examples),
                "few_shot": few_shot,
                "settings": settings,
                "models": scores,
                "roles": roles,
                "intervals": intervals,
                "margin": asdict(margin) if margin else None,
                "seconds": round(summary.seconds, 2),
            },
        )
        return summary


def _fingerprint(config: EvaluateConfig, task: TaskSpec, spec: str, runs: list[_Run], settings: dict) -> str:
    """What makes an evaluation what it is: the task, the data, each model run and the generation settings
    (not `--limit`: a larger sample of the same evaluation reuses the answers it has)."""
    models = [[run.name, _identity(run.model, config.engine), run.few_shot] for run in runs]
    payload = [task.model_dump(mode="json"), spec, models, settings]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _refuse_other_evaluation(stage: StageDir, fingerprint: str, task: TaskSpec, spec: str, runs: list[_Run]) -> None:
    """Refuse an `--out` holding anything but this evaluation: foreign files, or another evaluation's
    results (another model, task, data or settings), which would otherwise be overwritten."""
    stage.refuse_foreign()
    stats = read_stats(stage.path)
    if not stats:
        return
    if "fingerprint" in stats:
        same = stats["fingerprint"] == fingerprint
    else:  # made before evaluations had a fingerprint: compare what they recorded
        same = (
            stats.get("task") == task.name
            and stats.get("data") == spec
            and set(stats.get("models", {})) >= {run.name for run in runs}
        )
    if not same:
        raise RebaseError(
            f"--out {stage.path} holds another evaluation ({stats.get('task')} on {stats.get('data')}: "
            f"{', '.join(stats.get('models', {}))}); choose another --out"
        )


def _predictions(config: EvaluateConfig, task: TaskSpec, run: _Run, examples: list[dict], settings: dict) -> list[str]:
    """One model's answers to every example, generated where the cache has none."""
    from rebase.generate.engines import GenerationParams
    from rebase.generate.pool import GenerationPool

    identity = _identity(run.model, config.engine)
    prompts = [student_prompt(task, example["input"], run.few_shot) for example in examples]
    hashes = [_prompt_key(prompt, identity, settings) for prompt in prompts]
    params = GenerationParams(config.max_new_tokens, config.temperature, None, stop=STUDENT_STOP)
    pool = GenerationPool(config, run.model, chat=False)  # the student's own prompt format, no chat template
    what = f"evaluate {run.name}"
    answers, _ = pool.answer(dict(zip(hashes, prompts)), config.out / "answers" / identity, params, what)
    failed = [h for h in hashes if answers[h].get("error")]
    if failed:
        raise RebaseError(
            f"{len(failed)} of {len(hashes)} answers from {run.model} failed ({answers[failed[0]]['error']}); "
            "run the same command again to retry them"
        )
    return [answers[h]["text"] for h in hashes]


def _prediction_row(
    task: TaskSpec, name: str, role: str, example: dict, prediction: str, scores: dict[str, list[float]], i: int
) -> dict:
    row = {
        "model": name,
        "role": role,
        "input": example["input"],
        "reference": example["reference"],
        "references": example["references"],
        "prediction": prediction,
        "answer": predicted_label(prediction, task.labels) if task.labels else final_answer(prediction),
        "exact_match": scores["exact_match"][i],
    }
    if task.labels:
        row["correct"] = scores["accuracy"][i]
    else:
        row["f1"] = scores["f1"][i]
    return row


def _identity(model: str, engine: str) -> str:
    """A name for a model's cached answers that changes when the model does: a student directory's
    training fingerprint, else a hash of its canonical name (and the engine)."""
    from rebase.models import canonical_model_name

    run = Path(model).expanduser() / "run.json"
    if run.is_file():
        return "student-" + json.loads(run.read_text())["fingerprint"]
    name = canonical_model_name(model) if engine != "openai" else f"openai:{model}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[-40:]
    return f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _prompt_key(prompt: str, identity: str, settings: dict) -> str:
    return hashlib.sha256(json.dumps([prompt, identity, settings], sort_keys=True).encode()).hexdigest()[:32]
