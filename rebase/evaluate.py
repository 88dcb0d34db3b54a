"""`rebase evaluate`: a model answers held-out examples (Ray actors, batched) and is scored, optionally
beside another model (the student's base) on the same examples.

Metrics are plain functions:
- exact match after SQuAD-style normalisation (lower case, no punctuation, no articles, single spaces);
- accuracy against the task's labels, on the final answer (the text after the last "the answer is" for
  chain-of-thought outputs, else the first line, else the leading words);
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
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rebase import precision
from rebase.config import EvaluateConfig
from rebase.errors import RebaseError
from rebase.io import write_parquet_atomic
from rebase.models import student_stats
from rebase.stage import StageDir
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
    label its first words spell ("Yes, because ..."); None when it gives none."""
    lines = prediction.strip().splitlines()
    for candidate in (final_answer(prediction), lines[0] if lines else ""):
        label = match_label(candidate, labels)
        if label is not None:
            return label
    words = normalise(prediction).split()
    return next((label for label in labels if words[: len(normalise(label).split())] == normalise(label).split()), None)


def label_correct(prediction: str, reference: str, labels: list[str]) -> float:
    """1.0 when the prediction names the same label as the reference."""
    predicted = predicted_label(prediction, labels)
    expected = match_label(final_answer(reference), labels)
    return float(predicted is not None and predicted == expected)


def score(task: TaskSpec, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean metrics over examples: exact match always, accuracy on labels when the task has labels,
    F1 when it has none (free-text answers such as extractive QA)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError("need one list of references per prediction, and at least one prediction")
    count = len(predictions)
    metrics = {"exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / count}
    if task.labels:
        metrics["accuracy"] = sum(label_correct(p, r[0], task.labels) for p, r in zip(predictions, references)) / count
    else:
        metrics["f1"] = sum(token_f1(p, r) for p, r in zip(predictions, references)) / count
    return {name: round(value, 4) for name, value in metrics.items()}


# ---------------------------------------------------------------- the evaluation stage

_OWN_FILES = frozenset({"answers", "predictions.parquet", "stats.json", "_SUCCESS"})


def read_eval_set(spec: str, task: TaskSpec, limit: int | None = None) -> list[dict]:
    """Held-out examples {input, reference} from a datastore SPEC (bigbench:task, files:..., hf:...); the
    source's answers mapped to the task's labels (`eval_answers`); `limit` takes a fixed sample."""
    from rebase.datastore.sources import open_source

    seen: dict[str, dict] = {}
    for dataset in open_source(spec).datasets():
        for _, _, row, _ in dataset.read(list(range(sum(dataset.count())))):
            text, answer = (row or {}).get("input"), (row or {}).get("output")
            if text is None or answer is None or not str(text).strip() or not str(answer).strip():
                continue
            answer = str(answer).strip()
            seen.setdefault(
                str(text).strip(), {"input": str(text).strip(), "reference": task.eval_answers.get(answer, answer)}
            )
    if not seen:
        raise RebaseError(f"{spec} has no rows with an input and an output to evaluate on (fields 'input', 'output')")
    examples = sorted(seen.values(), key=lambda e: hashlib.sha256(e["input"].encode()).hexdigest())
    return examples[:limit] if limit else examples


@dataclass
class EvaluateSummary:
    out: Path
    data: str
    examples: int
    models: dict[str, dict[str, float]]
    roles: dict[str, str]
    seconds: float

    def table(self) -> str:
        metrics = sorted({name for scores in self.models.values() for name in scores})
        width = max(len(f"{m} ({self.roles[m]})") for m in self.models) + 2
        lines = [f"{'model':<{width}}" + "".join(f"{name:>13}" for name in metrics)]
        for model, scores in self.models.items():
            label = f"{model} ({self.roles[model]})"
            lines.append(f"{label:<{width}}" + "".join(f"{scores.get(name, float('nan')):>13.4f}" for name in metrics))
        return "\n".join(lines)

    def line(self) -> str:
        scores = "; ".join(
            f"{model}: " + ", ".join(f"{name} {value:.3f}" for name, value in metrics.items())
            for model, metrics in self.models.items()
        )
        return f"evaluated on {self.examples} examples of {self.data}: {scores}; {self.seconds:.0f} s -> {self.out}"


def evaluate(config: EvaluateConfig) -> EvaluateSummary:
    """Score the model (and `compare`) on held-out data; answers are cached, so a re-run resumes."""
    from rebase.generate.engines import GenerationParams
    from rebase.generate.pool import GenerationPool

    started = time.monotonic()
    task = load_task(config.task)
    spec = config.data or task.eval
    if not spec:
        raise RebaseError(f"task '{task.name}' names no eval source; pass --data SPEC (bigbench:T, files:PATH, hf:ID)")
    trained = student_stats(config.model)
    few_shot = config.few_shot if config.few_shot is not None else bool(trained.get("config", {}).get("few_shot"))
    models = {config.model: "student" if trained else "model"}
    if config.compare:
        base = config.compare
        if base == "base":
            if not trained:
                raise RebaseError(f"--compare base needs a student made by rebase train; {config.model} is not one")
            base = trained["summary"]["student"]
        if base in models:
            raise RebaseError(f"--compare names the model under evaluation ({base}); name another")
        models[base] = "base" if config.compare == "base" or trained else "compare"
    out = config.out
    stage = StageDir(out, "a rebase evaluation", _OWN_FILES)
    stage.refuse_foreign()
    examples = read_eval_set(spec, task, config.limit)
    prompts = [student_prompt(task, example["input"], few_shot) for example in examples]
    params = GenerationParams(config.max_new_tokens, config.temperature, None, stop=STUDENT_STOP)
    settings = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "stop": STUDENT_STOP}
    settings |= precision.hashed(config.dtype, config.engine)
    print(f"evaluate: {len(examples)} examples of {spec}, {len(models)} model(s)", file=sys.stderr)
    scores: dict[str, dict[str, float]] = {}
    rows = []
    for model in models:
        identity = _identity(model, config.engine)
        hashes = [_prompt_key(prompt, identity, settings) for prompt in prompts]
        pool = GenerationPool(config, model, chat=False)  # the student's own prompt format, no chat template
        answers, _ = pool.answer(dict(zip(hashes, prompts)), out / "answers" / identity, params, f"evaluate {model}")
        failed = [h for h in hashes if answers[h].get("error")]
        if failed:
            raise RebaseError(
                f"{len(failed)} of {len(hashes)} answers from {model} failed ({answers[failed[0]]['error']}); "
                "run the same command again to retry them"
            )
        predictions = [answers[h]["text"] for h in hashes]
        references = [[example["reference"]] for example in examples]
        scores[model] = score(task, predictions, references)
        for example, prediction in zip(examples, predictions):
            rows.append(_prediction_row(task, model, models[model], example, prediction))
    stage.begin("")
    write_parquet_atomic(out / "predictions.parquet", pa.Table.from_pylist(rows))
    summary = EvaluateSummary(out, spec, len(examples), scores, models, time.monotonic() - started)
    stage.finish(
        {
            "task": task.name,
            "data": spec,
            "examples": len(examples),
            "few_shot": few_shot,
            "settings": settings,
            "models": scores,
            "roles": models,
            "seconds": round(summary.seconds, 2),
        },
    )
    return summary


def _prediction_row(task: TaskSpec, model: str, role: str, example: dict, prediction: str) -> dict:
    reference = example["reference"]
    row = {
        "model": model,
        "role": role,
        "input": example["input"],
        "reference": reference,
        "prediction": prediction,
        "answer": predicted_label(prediction, task.labels) if task.labels else final_answer(prediction),
        "exact_match": exact_match(prediction, [reference]),
    }
    if task.labels:
        row["correct"] = label_correct(prediction, reference, task.labels)
    else:
        row["f1"] = token_f1(prediction, [reference])
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
