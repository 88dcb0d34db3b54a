"""Decontamination (rebase/decontaminate.py): the evaluation set's n-grams and threshold on hand-made
inputs, then a store with planted copies of evaluation items (exact, lightly edited, paraphrased) through
`rebase retrieve` (real Ray build, real MiniLM), and planted teacher answers that copy evaluation items
through `rebase transform` (answer caches seeded, as in tests/test_gates.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from test_gates import _plant, unit

from rebase.config import DatastoreConfig, RetrieveConfig, TransformConfig, build_config
from rebase.datastore import build_datastore
from rebase.decontaminate import SIMILARITY_FLOOR, EvalSet, derived_ngram, derived_threshold, describe, words
from rebase.retrieve import retrieve_stage
from rebase.task import load_task
from rebase.teacher import transform
from rebase.teacher.prompts import prompt_hash, transform_prompt

EVAL = [  # held-out items of a sports-plausibility task, each 13 words or more
    "The goalkeeper saved a penalty kick in the final minute of the championship match against the visiting team.",
    "Lionel Messi threw a touchdown pass to win the Super Bowl for his team in overtime.",
    "Serena Williams hit an ace on match point to win the final set at Wimbledon last summer.",
    "The pitcher struck out three batters in a row to end the ninth inning of the World Series game.",
    "The point guard made a buzzer beater three pointer from half court to win the basketball game.",
    "The cyclist climbed the last mountain stage alone and took the yellow jersey in the Tour de France.",
]
EXACT = {"sentence": EVAL[0], "label": "plausible"}
EDITED = {"sentence": EVAL[1].replace("overtime.", "double overtime!").upper(), "label": "implausible"}
PARAPHRASE = {"sentence": "Last summer at Wimbledon, Serena Williams won the final set with an ace on match point."}
CLEAN = [  # the same kind of sentence, about other things: never a match
    {"sentence": "Tom Brady threw a long pass late in the game to beat the Chiefs in the playoffs.", "label": "yes"},
    {"sentence": "The striker scored twice in the second half of the derby at the home stadium.", "label": "yes"},
    {"sentence": "The swimmer broke the world record in the butterfly at the Olympic final.", "label": "yes"},
    {"sentence": "The batter hit a walk-off home run to win the playoff game for the Red Sox.", "label": "yes"},
]
TASK = {
    "name": "sport_plausible",
    "instruction": "Is the following sentence about sports plausible? Answer yes or no.",
    "examples": [
        {"input": "Kylian Mbappe scored a hat trick in the World Cup final.", "output": "yes"},
        {"input": "LeBron James caught a touchdown pass in the Stanley Cup final.", "output": "no"},
    ],
    "labels": ["yes", "no"],
    "ban": ["files/own_eval"],
}


# ------------------------------------------------------------------ the evaluation set on hand-made inputs


def test_long_ngrams_match_after_normalisation_and_short_inputs_only_whole():
    inputs = [
        EVAL[0],
        "Take 3 steps left. Take 2 steps forward. Turn around.",  # 10 words: matched whole only
        "Is it plausible?",  # 3 words: never by words
    ]
    eval_set = EvalSet.build(inputs, lambda texts: np.eye(len(texts), 8, dtype=np.float32))
    assert eval_set.overlap(EVAL[0].upper().replace(",", "")).startswith("13-gram overlap with eval input 'The goal")
    twelve = " ".join(EVAL[0].split()[:12])  # twelve words in common are not enough
    assert eval_set.overlap(f"Yesterday {twelve} and more") is None
    assert eval_set.overlap("So: take 3 steps left, take 2 steps forward; turn around!").startswith("holds the whole")
    assert eval_set.overlap("Take 3 steps left. Take 2 steps forward.") is None
    assert eval_set.overlap("Is it plausible? Yes it is.") is None
    # a generated input is one input: it matches a short evaluation input only by being it
    assert eval_set.overlap("Take 3 steps left, take 2 steps forward. Turn around.", within=False).startswith("is eval")
    assert eval_set.overlap("So: take 3 steps left, take 2 steps forward; turn around!", within=False) is None
    assert eval_set.overlap("Something else entirely.") is None


def test_the_ngram_length_grows_where_evaluation_inputs_share_runs():
    distinct = [words(text) for text in EVAL]
    assert derived_ngram(distinct, 13) == 13
    # formulaic walks: every pair shares its first 20 words ("always face forward", the 16 of `common`, "take")
    common = "take 1 step right take 2 steps right take 3 steps right take 4 steps right"
    walks = [words(f"always face forward {common} take {n} steps left") for n in range(5, 25)]
    n = derived_ngram(walks, 13)
    assert n == 21  # one word longer than the run every walk shares
    eval_set = EvalSet.build([" ".join(w) for w in walks], lambda texts: np.eye(len(texts), 8, dtype=np.float32))
    assert eval_set.n == 21
    assert eval_set.overlap(f"walk: {common} then stop") is None  # 16 shared words: any walk has them
    # inputs shorter than every candidate length are matched whole
    assert derived_ngram([words("a b c d e f g h i"), words("a b c d e f g h i")], 4) == 10


def test_the_similarity_threshold_comes_from_the_evaluation_set():
    # nearest-neighbour similarities 0.6, 0.6 and 0.8ish: the floor decides
    assert derived_threshold(unit([1, 0, 0], [0.6, 0.8, 0], [0, 0.6, 0.8])) == SIMILARITY_FLOOR
    # items nearly alike (navigate's walks): the threshold rises with them, and near copies still match
    alike = unit([1, 0.010, 0], [1, 0.012, 0], [1, 0, 0.011])
    assert derived_threshold(alike) > 0.9999
    assert derived_threshold(unit([1, 0, 0])) == SIMILARITY_FLOOR  # one item: nothing to derive from
    eval_set = EvalSet.build(["a b", "c d", "e f"], lambda texts: unit([1, 0, 0], [0, 1, 0], [0, 0, 1]))
    found = eval_set.near(unit([0.95, 0.3, 0], [0.7, 0.7, 0]))
    assert found[0].startswith("similarity 0.954 to eval input 'a b'") and found[1] is None
    fixed = EvalSet.build(["a b", "c d"], lambda texts: unit([1, 0, 0], [0, 1, 0]), similarity=0.7)
    assert fixed.threshold == 0.7 and fixed.near(unit([0.7, 0.7, 0]))[0] is not None


def test_describe_says_what_was_compared():
    assert describe(None, "rows").startswith("Not compared with the evaluation set (made before")
    assert describe({"checked": False, "why": "decontamination is off"}, "rows").endswith("decontamination is off.")
    line = describe(
        {"checked": True, "eval_inputs": 6, "ngram": 13, "similarity_threshold": 0.9, "contaminated": 3,
         "by_ngram": 2, "by_similarity": 1, "rows_not_sent": 2},
        "generated inputs",
    )  # fmt: skip
    assert line.startswith("Compared with the task's 6 evaluation inputs: 3 generated inputs copy one (2 by a 13-gram")
    assert "2 retrieved rows that copy one were never sent to the teacher" in line


# ------------------------------------------------------------------ a store with planted copies


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A store whose sports dataset holds an exact, an edited and a paraphrased copy of evaluation items
    beside clean rows; the task's own evaluation file is in the store too, and banned."""
    root = tmp_path_factory.mktemp("leaky")
    data = root / "data"
    data.mkdir()
    rows = [EXACT, *CLEAN[:2], EDITED, *CLEAN[2:], PARAPHRASE]
    (data / "sports_news.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "sports_news.jsonl.description.txt").write_text("Sentences about sports, labelled for plausibility.")
    answers = ["no", "no", "yes", "yes", "no", "yes"]
    own = [{"input": text, "output": answer} for text, answer in zip(EVAL, answers)]
    (data / "own_eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in own))
    (data / "own_eval.jsonl.description.txt").write_text("The task's held-out sentences.")
    store = root / "store"
    build_datastore(DatastoreConfig(sources=[f"files:{data}"], out=store))
    task = root / "task.yaml"
    task.write_text(yaml.safe_dump({**TASK, "eval": f"files:{data / 'own_eval.jsonl'}"}))
    return root, store, task


def _retrieve(leaky, target: str, **fields) -> tuple[list[dict], dict]:
    root, store, task = leaky
    config = RetrieveConfig(datastore=store, task=task, out=root / target, top_k=7, exact=True, **fields)
    retrieve_stage(config)
    rows = pq.read_table(root / target / "rows.parquet").to_pylist()
    return rows, json.loads((root / target / "stats.json").read_text())


def test_retrieve_marks_the_planted_copies_and_only_them(leaky):
    rows, stats = _retrieve(leaky, "retrieved")
    assert len(rows) == 7 and {row["dataset_id"] for row in rows} == {"files/sports_news"}  # own eval banned
    found = {json.loads(row["row"])["sentence"]: row for row in rows}
    assert found[EXACT["sentence"]]["contamination"].startswith("13-gram overlap with eval input 'The goalkeeper")
    assert found[EDITED["sentence"]]["contamination"].startswith("13-gram overlap with eval input 'Lionel Messi")
    assert found[PARAPHRASE["sentence"]]["contamination"].startswith("similarity 0.9")
    assert "'Serena Williams hit an ace" in found[PARAPHRASE["sentence"]]["contamination"]
    for row in CLEAN:
        assert not found[row["sentence"]]["contaminated"] and found[row["sentence"]]["contamination"] is None
    assert [found[s]["contaminated"] for s in (EXACT["sentence"], EDITED["sentence"], PARAPHRASE["sentence"])] == [
        True
    ] * 3
    assert stats["contamination"] == {
        "checked": True,
        "eval_inputs": 6,
        "ngram": 13,
        "similarity_threshold": SIMILARITY_FLOOR,  # six unlike sentences: the floor
        "contaminated": 3,
        "by_ngram": 2,
        "by_similarity": 1,
    }


def test_retrieve_without_decontamination_marks_nothing(leaky):
    rows, stats = _retrieve(leaky, "open", decontaminate=False)
    assert not any(row["contaminated"] for row in rows)
    assert stats["contamination"] == {"checked": False, "why": "decontamination is off"}


def test_transform_never_sends_contaminated_rows_and_flags_copied_generations(leaky):
    """The teacher's answers are planted for the clean rows only (a contaminated row sent would load the
    teacher: `sent` would not be 0). Of them, one writes an evaluation item out with small edits and one
    paraphrases another; the rest are new sentences."""
    root, _, task_path = leaky
    rows, _ = _retrieve(leaky, "retrieved")
    out = root / "transformed"
    off = {"consistency": False, "max_label_share": 1.0, "fit_threshold": -1.0, "near_duplicate_similarity": 1.0}
    values = {"retrieved": root / "retrieved", "task": task_path, "out": out, "dtype": "float32", **off}
    config = build_config(TransformConfig, values)
    task = load_task(task_path)
    settings = {"max_new_tokens": config.max_new_tokens, "temperature": 0.0, "constrained": True}
    generated = iter(
        [
            EVAL[3].replace("three batters", "3 batters"),  # memorised, lightly edited: a 13-gram remains
            "To win the basketball game, the point guard made a three pointer from half court at the buzzer.",
            "The goalkeeper dribbled past every defender and scored with a header from a corner kick.",
            "The marathon runner won the race after leading from the first kilometre to the finish line.",
        ]
    )
    answers, expected = {}, []
    for row in rows:
        if row["contaminated"]:
            expected.append(("contaminated", "contaminated: the retrieved row: "))
            continue
        text = next(generated)
        prompt = transform_prompt(task, json.loads(row["row"]), config.max_value_chars)
        answers[prompt_hash(prompt, config.teacher, settings)] = json.dumps({"input": text, "output": "yes"})
        expected.append(
            ("contaminated", "contaminated: the generated input: 13-gram")
            if text.startswith("The pitcher")
            else ("contaminated", "contaminated: the generated input: similarity")
            if text.startswith("To win the basketball")
            else ("ok", None)
        )
    _plant(out / "answers", answers)

    summary = transform(config)
    assert summary.sent == 0  # no prompt of a contaminated row was sent (nor any other: all planted)
    records = pq.read_table(out / "records.parquet").to_pylist()
    for record, (status, reason) in zip(records, expected):
        assert record["status"] == status, record
        assert (record["reason"] or "").startswith(reason or ""), record
    stats = json.loads((out / "stats.json").read_text())
    assert stats["statuses"] == {"contaminated": 5, "ok": 2}
    assert stats["contamination"] == {
        "checked": True,
        "eval_inputs": 6,
        "ngram": 13,
        "similarity_threshold": SIMILARITY_FLOOR,
        "contaminated": 2,
        "by_ngram": 1,
        "by_similarity": 1,
        "rows_not_sent": 3,
    }
    assert stats["reasons"] == {"contaminated: the retrieved row": 3, "contaminated: the generated input": 2}


@pytest.mark.parametrize("flag, value", [("--contamination-ngram", "2"), ("--contamination-similarity", "1.5")])
def test_decontamination_settings_out_of_range_are_one_line_and_exit_2(tmp_path, flag, value):
    command = [
        sys.executable,
        "-m",
        "rebase",
        "retrieve",
        "--datastore",
        str(tmp_path),
        "--task",
        str(tmp_path / "t.yaml"),
    ]
    command += ["--out", str(tmp_path / "out"), flag, value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert flag.lstrip("-").replace("-", "_") in result.stderr
