"""Teacher answers -> records: parse leniently, validate strictly, keep every record with its status.

Statuses (DESIGN.md): `ok` (used for training), `parse_error` (no usable JSON object), `rejected` (an
empty field, an answer outside the task's labels, an input or reasoning that copies a few-shot example
with at most small edits, a "no" from the judge), `duplicate` (the same input as an earlier record,
ignoring case, spacing and punctuation), and `failed` (a request the engine could not answer, such as
an endpoint that kept failing; it is not cached, so a re-run sends it again).
"""

from __future__ import annotations

import difflib
import json
import re

from rebase.task import TaskSpec, match_label, normalise, split_rationale

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_completion(text: str, fields: tuple[str, ...]) -> tuple[dict | None, str | None]:
    """(fields, None) from the first JSON object in `text` holding every field in `fields`, or (None, why).
    Lenient: the object may sit in a code fence or among other text, and scalar values become text."""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    error = "no JSON object in the answer"
    for candidate in candidates:
        for start in (i for i, char in enumerate(candidate) if char == "{"):
            try:
                value, _ = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError as failure:
                error = f"broken JSON ({failure.msg})"
                continue
            if not isinstance(value, dict):
                continue
            missing = [field for field in fields if field not in value]
            if missing:
                error = "JSON object without " + ", ".join(f"'{field}'" for field in missing)
                continue
            record = {}
            for field in fields:
                item = value[field]
                if isinstance(item, (dict, list)):
                    return None, f"field '{field}' is not text"
                record[field] = "" if item is None else str(item).strip() if isinstance(item, str) else json.dumps(item)
            return record, None
    return None, error


def training_output(task: TaskSpec, parsed: dict) -> tuple[str, str | None]:
    """(output the student learns, reasoning): for chain-of-thought tasks the reasoning followed by
    "So the answer is X." as in the task's examples."""
    if not task.reasons:
        return parsed["output"], None
    return f"{parsed['reasoning']} So the answer is {parsed['output']}.", parsed["reasoning"]


def check_records(task: TaskSpec, answers: list[dict]) -> list[dict]:
    """Validate answers in order (best-ranked first). Each answer has `row_uid` and `text` (or `error`);
    each record gets `input`, `output`, `reasoning`, `answer`, `status` and `reason`."""
    fields = ("input", "reasoning", "output") if task.reasons else ("input", "output")
    examples = [(normalise(e.input), normalise(training_reasoning(task, e.output))) for e in task.examples]
    seen: dict[str, str] = {}  # normalised input -> the row whose record first had it
    records = []
    for answer in answers:
        record = {"row_uid": answer["row_uid"], "input": None, "output": None, "reasoning": None, "answer": None}
        if answer.get("error"):
            records.append({**record, "status": "failed", "reason": answer["error"]})
            continue
        parsed, error = parse_completion(answer["text"], fields)
        if parsed is None:
            cut = " (cut off at the token limit)" if answer.get("finish_reason") == "length" else ""
            records.append({**record, "status": "parse_error", "reason": error + cut})
            continue
        status, reason = "ok", None
        empty = [field for field in fields if not parsed[field].strip()]
        label = (
            match_label(split_rationale(parsed["output"])[1] or parsed["output"], task.labels) if task.labels else None
        )
        if empty:
            status, reason = "rejected", "empty " + ", ".join(empty)
        elif task.labels and label is None:
            status, reason = "rejected", f"answer '{parsed['output'][:60]}' is not one of the labels"
        if label is not None:
            parsed["output"] = label
        output, reasoning = training_output(task, parsed)
        key = normalise(parsed["input"])
        copied = _copied_example(examples, key, normalise(reasoning or ""))
        if status == "ok" and copied:
            status, reason = "rejected", copied
        elif status == "ok" and key in seen:
            status, reason = "duplicate", f"same input as row {seen[key]}"
        if status == "ok":
            seen[key] = answer["row_uid"]
        answer_text = parsed["output"] if task.reasons or task.labels else None
        records.append(
            {
                **record,
                "input": parsed["input"],
                "output": output,
                "reasoning": reasoning,
                "answer": answer_text,
                "status": status,
                "reason": reason,
            }
        )
    return records


def training_reasoning(task: TaskSpec, output: str) -> str:
    """The reasoning part of an example output (empty for tasks without chain of thought)."""
    return split_rationale(output)[0] if task.reasons else ""


def _copied_example(examples: list[tuple[str, str]], text: str, reasoning: str) -> str | None:
    """Why a record copies a few-shot example, or None: its input, or its reasoning, is the example's
    with at most small edits (90% alike, so "is not (0, 0)" -> "is (0, 0)" still counts as a copy)."""
    for number, (example_input, example_reasoning) in enumerate(examples, 1):
        if _alike(text, example_input):
            return f"copies few-shot example {number}"
        if reasoning and example_reasoning and _alike(reasoning, example_reasoning):
            return f"copies the reasoning of few-shot example {number}"
    return None


def _alike(first: str, second: str, threshold: float = 0.9) -> bool:
    if first == second:
        return True
    matcher = difflib.SequenceMatcher(None, first, second, autojunk=False)
    return (
        matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold
    )


def judge_verdict(text: str) -> bool | None:
    """The judge's yes/no: True, False, or None when the answer starts with neither."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    return True if words[0] == "yes" else False if words[0] == "no" else None
