"""`rebase transform`: retrieved rows -> prompts -> teacher answers (a Ray Data actor pool) -> checked records.

Reads a retrieved directory, writes a transformed directory (DESIGN.md):
    answers/part-*.parquet   the teacher's raw answers, keyed by prompt hash, one file per engine batch
    judged/part-*.parquet    the judge's raw answers (with `judge: true`)
    consistency/part-*.parquet  the teacher's second answers to its own inputs (with `consistency: true`)
    records.parquet          one record per retrieved row: the example, its status and why, its lineage
    stats.json, _SUCCESS
Answers are written as each batch returns, so a crash or Ctrl-C loses at most the batches in flight, and a
re-run sends only prompts that have no answer yet. Records are re-derived from the answers on every run,
so a change to validation never needs the teacher again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rebase import decontaminate, precision
from rebase.config import TransformConfig
from rebase.decontaminate import CONTAMINATED, EvalSet, eval_inputs
from rebase.decontaminate import settings as decontamination_settings
from rebase.errors import RebaseError
from rebase.generate.engines import GenerationParams
from rebase.generate.pool import GenerationPool, GenerationRun
from rebase.io import read_parquet, write_parquet_atomic
from rebase.stage import StageDir, read_stats
from rebase.task import STUDENT_STOP, TaskSpec, load_task, student_prompt
from rebase.teacher import gates
from rebase.teacher.parse import check_records, judge_verdict
from rebase.teacher.prompts import judge_prompt, output_schema, prompt_hash, transform_prompt

RECORD_SCHEMA = pa.schema(
    [
        ("rank", pa.int64()),
        ("row_uid", pa.string()),
        ("dataset_id", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("reasoning", pa.string()),
        ("answer", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("teacher", pa.string()),
        ("prompt_hash", pa.string()),
        ("row", pa.string()),
    ]
)
_OWN_FILES = frozenset({"answers", "judged", "consistency", "records.parquet", "stats.json", "_SUCCESS"})


@dataclass
class TransformSummary:
    out: Path
    rows: int
    statuses: dict[str, int]
    reasons: dict[str, int]
    sent: int
    cached: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    generation_seconds: float = 0.0

    def line(self) -> str:
        order = ["ok", "rejected", "duplicate", "contaminated", "parse_error", "failed"]
        statuses = ", ".join(f"{self.statuses[s]} {s}" for s in order if self.statuses.get(s))
        reasons = "; ".join(f"{reason} {count}" for reason, count in sorted(self.reasons.items(), key=lambda i: -i[1]))
        rate = f", {self.sent / self.generation_seconds:.2f} examples/s" if self.generation_seconds else ""
        return (
            f"transformed {self.rows} rows: {statuses}{f' ({reasons})' if reasons else ''}; "
            f"{self.sent} sent, {self.cached} answered before; "
            f"tokens {self.prompt_tokens:,} in / {self.completion_tokens:,} out; {self.seconds:.0f} s{rate} "
            f"-> {self.out}"
        )


def _settings(config: TransformConfig) -> dict:
    """The generation settings a teacher answer's prompt hash holds."""
    return {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "constrained": config.constrained,
        **precision.hashed(config.dtype, config.engine),
    }


def transform(config: TransformConfig) -> TransformSummary:
    """Turn the retrieved rows into task examples with the teacher; resumable, every row accounted for."""
    started = time.monotonic()
    task = load_task(config.task)
    rows = read_retrieved(config.retrieved, config.limit)
    settings = _settings(config)
    fingerprint = _fingerprint(task, config, settings)
    out = config.out
    stage = StageDir(out, "a rebase transform", _OWN_FILES)
    stage.check(fingerprint)  # a finished one is redone from its cached answers, cheaply
    with stage.writing():
        schema = output_schema(task) if config.constrained else None
        params = GenerationParams(config.max_new_tokens, config.temperature, schema)
        prompts = [transform_prompt(task, json.loads(row["row"]), config.max_value_chars) for row in rows]
        hashes = [prompt_hash(prompt, config.teacher, settings) for prompt in prompts]
        clean = {h: prompt for row, h, prompt in zip(rows, hashes, prompts) if not _withheld(config, row)}
        teacher = GenerationPool(config, config.teacher)
        answers, run = teacher.answer(clean, out / "answers", params, "transform")
        records = check_records(task, [_answered(row, answers.get(h)) for row, h in zip(rows, hashes)])
        vectors = _Vectors(config)  # one embedder for both checks, each generated input encoded once
        contamination = _decontaminate(config, task, records, rows, vectors)
        threshold = _embedding_gates(config, task, records, vectors)
        if config.judge:
            judged = [n for n, record in enumerate(records) if record["status"] == "ok"]
            judge_prompts = [judge_prompt(task, records[n]) for n in judged]
            judge_hashes = [prompt_hash(p, config.teacher, {"judge": True}) for p in judge_prompts]
            verdicts, judge_run = teacher.answer(
                dict(zip(judge_hashes, judge_prompts)), out / "judged", GenerationParams(4, 0.0, None), "judge"
            )
            run = run + judge_run
            for n, h in zip(judged, judge_hashes):
                _apply_verdict(records[n], verdicts[h])
        if config.consistency:
            run = run + _consistency_gate(config, task, records, teacher, settings)
        if task.labels:
            gates.balance_labels(records, config.max_label_share)
        for record, row, h in zip(records, rows, hashes):
            record.update(
                rank=row["rank"], dataset_id=row["dataset_id"], teacher=config.teacher, prompt_hash=h, row=row["row"]
            )
        statuses = Counter(record["status"] for record in records)
        reasons = Counter(
            _reason_kind(record["reason"]) for record in records if record["status"] not in ("ok",) and record["reason"]
        )
        stats = {
            "task": task.name,
            "retrieved": str(config.retrieved),
            "teacher": config.teacher,
            "engine": config.engine,
            "settings": {
                **settings,
                "max_value_chars": config.max_value_chars,
                "judge": config.judge,
                **_gate_settings(config),
            },
            "gates": gates.gate_counts(records),
            "fit_threshold": None if threshold is None else round(threshold, 4),
            "contamination": contamination,
            "limit": config.limit,
            "fingerprint": fingerprint,
            "rows": len(records),
            "statuses": dict(statuses),
            "reasons": dict(reasons),
            "sent": run.sent,
            "cached": run.cached,
            "prompt_tokens": run.prompt_tokens,
            "completion_tokens": run.completion_tokens,
            "generation_seconds": round(run.seconds, 2),
            "cost": _cost(config, run.sent_prompt_tokens, run.sent_completion_tokens),
            "rate_limits": teacher.limits(),
            "seconds": round(time.monotonic() - started, 2),
        }
        stage.begin(fingerprint)
        write_parquet_atomic(out / "records.parquet", pa.Table.from_pylist(records, schema=RECORD_SCHEMA))
        stage.finish(stats)
        return TransformSummary(
            out=out,
            rows=len(records),
            statuses=dict(statuses),
            reasons=dict(reasons),
            sent=run.sent,
            cached=run.cached,
            prompt_tokens=run.prompt_tokens,
            completion_tokens=run.completion_tokens,
            seconds=time.monotonic() - started,
            generation_seconds=run.seconds,
        )


def _cost(config: TransformConfig, prompt_tokens: int, completion_tokens: int) -> dict | None:
    """What this run's requests cost at the configured prices (answers cached before cost nothing now)."""
    prices = (config.price_input_per_million, config.price_output_per_million)
    if prices == (None, None):
        return None
    usd = (prompt_tokens * (prices[0] or 0.0) + completion_tokens * (prices[1] or 0.0)) / 1e6
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "price_input_per_million": prices[0],
        "price_output_per_million": prices[1],
        "usd": round(usd, 6),
    }


def dry_run(config: TransformConfig) -> str:
    """What `rebase transform` would send, without calling the teacher or writing anything: the prompts of
    the first pass not answered before, their tokens, the most they may generate and, with prices, the
    projected cost; then the first prompt in full."""
    from rebase.generate.pool import _read_answers

    task = load_task(config.task)
    rows = read_retrieved(config.retrieved, config.limit)
    settings = _settings(config)
    prompts = {}
    for row in rows:
        if not _withheld(config, row):
            prompt = transform_prompt(task, json.loads(row["row"]), config.max_value_chars)
            prompts.setdefault(prompt_hash(prompt, config.teacher, settings), prompt)
    answered = _read_answers(config.out / "answers")
    pending = [prompt for h, prompt in prompts.items() if h not in answered]
    count, how = _token_counter(config)
    prompt_tokens = sum(count(prompt) for prompt in pending)
    most_out = len(pending) * config.max_new_tokens
    lines = [
        f"dry run: {len(rows):,} retrieved rows, {len(rows) - len(prompts):,} not sent (contaminated or the same "
        f"prompt), {len(prompts) - len(pending):,} answered before; {len(pending):,} prompts to send to "
        f"{config.teacher} ({config.engine})",
        f"tokens: {prompt_tokens:,} in ({how}); at most {most_out:,} out ({len(pending):,} x max_new_tokens "
        f"{config.max_new_tokens})",
    ]
    cost_in, cost_out = _cost(config, prompt_tokens, 0), _cost(config, 0, most_out)
    if cost_in is not None:
        lines.append(
            f"projected cost: ${cost_in['usd']:.4f} in + at most ${cost_out['usd']:.4f} out = at most "
            f"${cost_in['usd'] + cost_out['usd']:.4f} (prices per million tokens: "
            f"{config.price_input_per_million} in, {config.price_output_per_million} out)"
        )
    else:
        lines.append("projected cost: no prices set (--price-input-per-million, --price-output-per-million)")
    if config.judge or config.consistency:
        passes = " and ".join(p for p, on in (("the judge", config.judge), ("consistency", config.consistency)) if on)
        lines.append(f"not counted: {passes} asks again for each record that passes (at most as many prompts)")
    if pending:
        lines += ["", "first prompt:", pending[0]]
    return "\n".join(lines)


def _token_counter(config: TransformConfig):
    """Count a prompt's tokens with the teacher's tokenizer where it is local, else estimate them."""
    from rebase.generate.limits import CHARS_PER_TOKEN

    if config.engine != "openai":
        from transformers import AutoTokenizer

        from rebase.models import resolve_model

        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(config.teacher)))
        return (lambda text: len(tokenizer(text)["input_ids"])), f"{config.teacher}'s tokenizer"
    estimate = f"estimated at {CHARS_PER_TOKEN} characters a token: a hosted model's tokenizer is not at hand"
    return (lambda text: len(text) // CHARS_PER_TOKEN + 1), estimate


def read_retrieved(directory: Path, limit: int | None = None) -> list[dict]:
    """The retrieved rows best first (at most `limit`); one clear error when the directory is not one."""
    path = Path(directory) / "rows.parquet"
    if not (Path(directory) / "_SUCCESS").exists() or not path.exists():
        raise RebaseError(
            f"{directory} is not a finished retrieval (no _SUCCESS and rows.parquet); run rebase retrieve"
        )
    table = read_parquet(path).sort_by("rank")
    if "contamination" not in table.column_names:  # a retrieval made before decontamination
        table = table.append_column("contamination", pa.nulls(table.num_rows, pa.string()))
    table = table.select(["rank", "row_uid", "dataset_id", "row", "contamination"])
    if limit is not None:
        table = table.slice(0, limit)
    if not table.num_rows:
        raise RebaseError(f"{directory} holds no retrieved rows")
    rows = table.to_pylist()
    for row in rows:
        try:
            value = json.loads(row["row"])
        except (TypeError, ValueError):
            value = None
        if not isinstance(value, dict):
            raise RebaseError(f"{path}: row {row['row_uid']} is not a JSON object; redo rebase retrieve")
    return rows


def _fingerprint(task: TaskSpec, config: TransformConfig, settings: dict) -> str:
    """What makes a transformed directory what it is (not `--limit`: a trial may grow into the full run)."""
    retrieved = read_stats(config.retrieved).get("fingerprint")
    payload = {
        "task": task.model_dump(mode="json"),
        "retrieved": retrieved,
        "teacher": config.teacher,
        "settings": settings,
        "max_value_chars": config.max_value_chars,
        "judge": config.judge,
        "gates": _gate_settings(config),
        **({"decontaminate": decontamination_settings(config)} if config.decontaminate else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _gate_settings(config: TransformConfig) -> dict:
    return {
        "embedder": config.embedder,
        "fit_margin": config.fit_margin,
        "fit_threshold": config.fit_threshold,
        "near_duplicate_similarity": config.near_duplicate_similarity,
        "consistency": config.consistency,
        "max_label_share": config.max_label_share,
    }


def _withheld(config: TransformConfig, row: dict) -> bool:
    """A retrieved row that copies an evaluation input is never handed to the teacher."""
    return bool(config.decontaminate and row["contamination"])


class _Vectors:
    """The transform's embedder (`config.embedder`), loaded when first needed: texts -> unit vectors, each
    distinct text encoded once however many checks ask for it."""

    def __init__(self, config: TransformConfig):
        self.config = config
        self.embedder = None
        self.known: dict[str, np.ndarray] = {}

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.embedder is None:
            from rebase.datastore.embed import Embedder
            from rebase.models import resolve_model

            self.embedder = Embedder(str(resolve_model(self.config.embedder)), threads=self.config.threads)
        missing = [text for text in dict.fromkeys(texts) if text not in self.known]
        if missing:
            self.known.update(zip(missing, self.embedder.encode(missing)))
        return np.stack([self.known[text] for text in texts])


def _embedding_gates(config: TransformConfig, task: TaskSpec, records: list[dict], embed: _Vectors) -> float | None:
    """The gates that need no second teacher pass: reasoning that contradicts its answer, then (on the
    inputs' embeddings) inputs off the task and near duplicates. Returns the task-fit threshold used
    (None when a single example leaves nothing to derive it from)."""
    markers = gates.conclusion_markers(task)
    for record in records:
        reason = gates.contradiction(task, markers, record) if record["status"] == "ok" else None
        if reason:
            record.update(status="rejected", reason=reason)
    ok = [record for record in records if record["status"] == "ok"]
    if not ok:
        return config.fit_threshold
    vectors = embed([record["input"] for record in ok])
    example_vectors = embed([example.input for example in task.examples])
    threshold = config.fit_threshold
    if threshold is None:
        threshold = gates.fit_threshold(example_vectors, config.fit_margin)
    if threshold is not None:
        gates.task_fit(ok, vectors, example_vectors, threshold)
    gates.near_duplicates(ok, vectors, config.near_duplicate_similarity)
    return threshold


def _answered(row: dict, answer: dict | None) -> dict:
    """What check_records reads for a row: the teacher's answer, or none for a row never sent (contaminated)."""
    if answer is None:
        return {"row_uid": row["row_uid"], "error": f"{CONTAMINATED}: not sent"}  # _decontaminate says why
    return {"row_uid": row["row_uid"], **answer}


def _decontaminate(
    config: TransformConfig, task: TaskSpec, records: list[dict], rows: list[dict], embed: _Vectors
) -> dict:
    """Retrieved rows that copy an evaluation input (never sent) and ok examples whose generated input does
    get the status `contaminated`, with the evaluation input they match. Returns stats.json's summary."""
    unsent = 0
    for record, row in zip(records, rows):
        if _withheld(config, row):
            record.update(status=CONTAMINATED, reason=f"{CONTAMINATED}: the retrieved row: {row['contamination']}")
            unsent += 1
    if not config.decontaminate:
        return {"checked": False, "why": "decontamination is off"}
    inputs = eval_inputs(task)
    if not inputs:
        return decontaminate.summary(None, [])
    eval_set = EvalSet.build(inputs, embed, config.contamination_ngram, config.contamination_similarity)
    ok = [record for record in records if record["status"] == "ok"]
    texts = [record["input"] for record in ok]
    reasons = eval_set.match(texts, embed(texts), within=False) if texts else []
    for record, reason in zip(ok, reasons):
        if reason:
            record.update(status=CONTAMINATED, reason=f"{CONTAMINATED}: the generated input: {reason}")
    stats = decontaminate.summary(eval_set, reasons)
    stats["rows_not_sent"] = unsent
    return stats


def _consistency_gate(
    config: TransformConfig, task: TaskSpec, records: list[dict], teacher: GenerationPool, settings: dict
) -> GenerationRun:
    """The teacher answers each ok input again with the task's examples in the prompt (greedy); a record
    whose second answer differs is rejected. Answers are cached like the first ones."""
    asked = [record for record in records if record["status"] == "ok"]
    prompts = [student_prompt(task, record["input"], few_shot=True) for record in asked]
    hashes = [prompt_hash(p, config.teacher, {"consistency": True, **settings}) for p in prompts]
    params = GenerationParams(config.max_new_tokens, 0.0, None, stop=STUDENT_STOP)
    again, run = teacher.answer(dict(zip(hashes, prompts)), config.out / "consistency", params, "consistency")
    for record, h in zip(asked, hashes):
        if again[h].get("error"):
            record.update(status="failed", reason=f"consistency: {again[h]['error']}")
        else:
            gates.consistency(task, record, again[h]["text"])
    return run


def _apply_verdict(record: dict, answer: dict) -> None:
    if answer.get("error"):
        record.update(status="failed", reason=f"judge: {answer['error']}")
        return
    verdict = judge_verdict(answer["text"])
    if verdict is False:
        record.update(status="rejected", reason="the judge said no")
    elif verdict is None:
        record.update(status="rejected", reason="the judge answered neither yes nor no")


def _reason_kind(reason: str) -> str:
    """A reason without its specifics, for counting ("answer 'Maybe' is not ..." -> "answer is not ...")."""
    if reason.startswith(CONTAMINATED):  # "contaminated: the retrieved row" or "...: the generated input"
        return ":".join(reason.split(":")[:2])
    gate = next((gate for gate in gates.GATES if reason.startswith(gate)), None)
    if gate:
        return gate
    if reason.startswith("answer '"):
        return "answer is not one of the labels"
    if reason.startswith("same input as row"):
        return "same input as an earlier row"
    if reason.startswith("copies few-shot example"):
        return "copies a few-shot example"
    if reason.startswith("copies the reasoning of"):
        return "copies a few-shot example's reasoning"
    return reason
