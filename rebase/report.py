"""The run report: `RUN/report.html` and `RUN/report.md`, plots first, for a person to look at.

Each section is a function that reads one stage's output from the run directory and returns a `Section`
of plain blocks (text, tables, plots); a stage that has not written its files yet gives a section that
says so. Two renderers turn the sections into markdown (plots as `report/NAME.svg` images) and into one
self-contained HTML file (the same SVG markup inlined, all text escaped).
"""

from __future__ import annotations

import html
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from rebase.config import STAGES
from rebase.decontaminate import describe
from rebase.io import write_bytes_atomic
from rebase.progress import duration

STATUS_ORDER = ("ok", "rejected", "duplicate", "contaminated", "parse_error")
STATUS_COLOURS = {
    "ok": "#2e7d32",
    "rejected": "#ef6c00",
    "duplicate": "#757575",
    "contaminated": "#ad1457",
    "parse_error": "#c62828",
}
STATE_COLOURS = {"done": "#1565c0", "running": "#ef6c00", "failed": "#c62828", "skipped": "#9e9e9e"}
EXAMPLES = 5
TOP_DATASETS = 15
VALUE_CHARS = 240

# Text stays text in the SVG (smaller, selectable, searchable); a fixed salt and no date keep files stable.
_PLOT_STYLE = {
    "svg.fonttype": "none",
    "svg.hashsalt": "rebase-report",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@dataclass
class Plot:
    name: str
    title: str
    svg: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    wrap: bool = False  # cells hold several lines (the examples table)


@dataclass
class Headline:
    text: str


@dataclass
class Section:
    title: str
    blocks: list[str | Headline | Table | Plot] = field(default_factory=list)


def write_report(run_dir: Path) -> Path:
    """Write `report.html`, `report.md` and the plots in `report/` for a run directory; returns the html path."""
    run_dir = Path(run_dir)
    run = _read_json(run_dir / "run.json") or {}
    sections = [
        _summary(run_dir, run),
        _datastore(run_dir, run),
        _retrieve(run_dir, run),
        _transform(run_dir, run),
        _train(run_dir, run),
        _evaluate(run_dir, run),
        _timings(run_dir, run),
    ]
    plots = [block for section in sections for block in section.blocks if isinstance(block, Plot)]
    plot_dir = run_dir / "report"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        _write_text(plot_dir / f"{plot.name}.svg", plot.svg)
    for stale in set(plot_dir.glob("*.svg")) - {plot_dir / f"{plot.name}.svg" for plot in plots}:
        stale.unlink()
    title = f"Run {run.get('name') or run_dir.name}"
    _write_text(run_dir / "report.md", _markdown(title, sections))
    _write_text(run_dir / "report.html", _html(title, sections))
    return run_dir / "report.html"


# Sections, in the order the report shows them.


def _summary(run_dir: Path, run: dict) -> Section:
    """The task, the headline (base vs student accuracy) and each stage's state and time."""
    task = run.get("task") or (_read_json(run_dir / "retrieve" / "stats.json") or {}).get("task", "?")
    section = Section("Summary", [f"Task: {task}", _headline(_read_json(run_dir / "evaluate" / "stats.json"))])
    stages = run.get("stages") or {}
    rows = [
        [
            stage,
            info.get("state", "?"),
            _duration(info.get("seconds")),
            _time(info.get("started")),
            _time(info.get("finished")),
        ]
        for stage, info in _in_stage_order(stages)
    ]
    if rows:
        section.blocks.append(Table(["stage", "state", "time", "started", "finished"], rows))
    else:
        section.blocks.append("Stage states unknown: run.json lists no stages.")
    return section


def _headline(evaluation: dict | None) -> Headline:
    """'Student 45.0% vs best baseline (base few-shot) 41.7% accuracy on 120 examples (data): margin ...',
    or why there is none yet."""
    if not evaluation:
        return Headline("Base vs student accuracy: not run yet.")
    metric = "accuracy" if any("accuracy" in m for m in evaluation["models"].values()) else "exact_match"
    examples = f"{evaluation.get('examples', '?')} examples of {evaluation.get('data', '?')}"
    margin = evaluation.get("margin")
    if margin and margin["metric"] in evaluation["models"].get(margin["over"], {}):
        roles = evaluation.get("roles", {})
        evaluated = next((name for name, role in roles.items() if role in ("student", "model")), None)
        if evaluated is not None:
            scores = evaluation["models"]
            student, best = scores[evaluated][margin["metric"]], scores[margin["over"]][margin["metric"]]
            return Headline(
                f"{roles[evaluated].capitalize()} {student:.1%} vs best baseline ({margin['role']}) {best:.1%} "
                f"{margin['metric']} on {examples}: margin {margin['value']:+.1%} "
                f"(95% {margin['low']:+.1%} to {margin['high']:+.1%})."
            )
    parts = []
    for role in ("student", "base"):
        for model, role_of_model in evaluation.get("roles", {}).items():
            if role_of_model == role and metric in evaluation["models"].get(model, {}):
                parts.append(f"{role} {evaluation['models'][model][metric]:.1%}")
    if not parts:
        parts = [f"{model} {scores.get(metric, 0):.1%}" for model, scores in evaluation["models"].items()]
    scores = " vs ".join(parts)
    return Headline(f"{scores[0].upper()}{scores[1:]} {metric} on {examples}.")


def _datastore(run_dir: Path, run: dict) -> Section:
    """How big the datastore is that retrieval searched."""
    stats = _read_json(run_dir / "datastore" / "stats.json")
    if stats is None:
        return _not_run("Datastore", "datastore", run)
    keys = [k for k in ("path", "datasets", "rows", "cells", "seconds") if k in stats]
    return Section("Datastore", [Table(["", "value"], [[key, _number(stats[key])] for key in keys])])


def _retrieve(run_dir: Path, run: dict) -> Section:
    """Retrieved rows per source dataset and the distribution of their scores."""
    rows_path = run_dir / "retrieve" / "rows.parquet"
    if not rows_path.is_file():
        return _not_run("Retrieved rows", "retrieve", run)
    columns = ["dataset_id", "score", "input_score", "output_score", "description_score"]
    table = pq.read_table(rows_path, columns=columns).to_pydict()
    stats = _read_json(run_dir / "retrieve" / "stats.json") or {}
    datasets = Counter(table["dataset_id"])
    facts = f"{len(table['dataset_id'])} rows from {len(datasets)} datasets"
    if "mode" in stats:
        facts += f" ({stats['mode']} search, top_k {stats.get('top_k', '?')})"
    if stats.get("match_kind"):
        kinds = " or ".join(stats.get("kinds") or [])
        facts += f"; {stats.get('off_kind', 0):,} candidates left out as not {kinds} like the task's inputs"
    if len(datasets) > TOP_DATASETS:
        rest = sum(count for _, count in datasets.most_common()[TOP_DATASETS:])
        facts += f"; the {TOP_DATASETS} largest are plotted, the other {len(datasets) - TOP_DATASETS} hold {rest} rows"
    return Section(
        "Retrieved rows",
        [
            facts + ".",
            describe(stats.get("contamination"), "retrieved rows"),
            _datasets_plot(datasets),
            _scores_plot({name: table[name] for name in columns[1:]}),
        ],
    )


def _transform(run_dir: Path, run: dict) -> Section:
    """Transform outcomes by status, the reasons rows were dropped, and a few rows beside the teacher's output."""
    records_path = run_dir / "transform" / "records.parquet"
    if not records_path.is_file():
        return _not_run("Teacher transform", "transform", run)
    records = pq.read_table(records_path).to_pylist()
    stats = _read_json(run_dir / "transform" / "stats.json") or {}
    statuses = stats.get("statuses") or Counter(record["status"] for record in records)
    reasons = stats.get("reasons") or Counter(record["reason"] for record in records if record.get("reason"))
    section = Section("Teacher transform", [])
    if "teacher" in stats:
        section.blocks.append(f"Teacher {stats['teacher']} ({stats.get('engine', '?')}), {len(records)} rows.")
    if stats.get("cost"):
        cost = stats["cost"]
        section.blocks.append(
            f"This run's requests cost ${cost['usd']:.4f} ({cost['prompt_tokens']:,} tokens in, "
            f"{cost['completion_tokens']:,} out, at {cost['price_input_per_million']} and "
            f"{cost['price_output_per_million']} USD per million)."
        )
    if stats.get("rate_limits"):
        limits = stats["rate_limits"]
        section.blocks.append(
            f"Rate limits rpm {limits['rpm']}, tpm {limits['tpm']}: {limits['requests']:,} requests, "
            f"{limits['waited_seconds']:,} s spent waiting for slots, {limits['retry_after_pauses']} pauses for "
            "Retry-After."
        )
    section.blocks.append(_statuses_plot(statuses))
    if reasons:
        ranked = sorted(reasons.items(), key=lambda item: -item[1])
        section.blocks.append(Table(["reason", "rows"], [[reason, str(count)] for reason, count in ranked]))
    section.blocks.append(describe(stats.get("contamination"), "generated inputs"))
    if stats.get("gates"):
        threshold = stats.get("fit_threshold")
        fit = f"; task fit needs similarity {threshold:.2f} to the task's example inputs" if threshold else ""
        section.blocks.append(f"Records each data gate removed (after the checks on each answer){fit}:")
        section.blocks.append(Table(["gate", "rows"], [[gate, str(count)] for gate, count in stats["gates"].items()]))
    section.blocks.append(f"A few source rows beside what the teacher made of them (up to {EXAMPLES}, ok first):")
    section.blocks.append(_examples_table(records))
    return section


def _examples_table(records: list[dict]) -> Table:
    """Up to EXAMPLES records, `ok` ones first in rank order: the source row | the teacher's example."""
    chosen = sorted(records, key=lambda record: (record["status"] != "ok", record["rank"]))[:EXAMPLES]
    rows = []
    for record in chosen:
        source = f"#{record['rank']} {record['dataset_id']}\n\n{_row_text(record['row'])}"
        teacher = [f"status: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else "")]
        teacher.append(f"input: {_truncate(record['input'])}")
        # The output usually repeats the reasoning (reasoning + "So the answer is ..."): show it once.
        if record.get("reasoning") and record["reasoning"] not in (record.get("output") or ""):
            teacher.append(f"reasoning: {_truncate(record['reasoning'])}")
        teacher.append(f"output: {_truncate(record.get('output') or '')}")
        rows.append([source, "\n\n".join(teacher)])
    return Table(["source row", "teacher's example"], rows, wrap=True)


def _row_text(row_json: str) -> str:
    """A flattened row as `field: value` lines, each value cut to VALUE_CHARS."""
    try:
        row = json.loads(row_json)
    except (TypeError, ValueError):
        return _truncate(str(row_json))
    if not isinstance(row, dict):
        return _truncate(str(row))
    return "\n".join(f"{key}: {_truncate(str(value))}" for key, value in row.items())


def _train(run_dir: Path, run: dict) -> Section:
    """The student's training loss per step and its summary numbers."""
    stats = _read_json(run_dir / "train" / "stats.json")
    if stats is None or "summary" not in stats:
        return _not_run("Training", "train", run)
    summary = stats["summary"]
    keys = [
        k for k in ("student", "method", "examples", "steps", "first_loss", "final_loss", "seconds") if k in summary
    ]
    section = Section("Training", [])
    if summary.get("losses"):
        section.blocks.append(_loss_plot(summary["losses"]))
    section.blocks.append(Table(["", "value"], [[key, _number(summary[key])] for key in keys]))
    return section


def _evaluate(run_dir: Path, run: dict) -> Section:
    """Base vs student (and any other model) on each metric, as bars and as a table."""
    stats = _read_json(run_dir / "evaluate" / "stats.json")
    if stats is None:
        return _not_run("Evaluation", "evaluate", run)
    models = stats.get("models", {})
    intervals = stats.get("intervals", {})
    labels = {model: _model_label(model, stats.get("roles", {})) for model in models}
    metrics = [m for m in ("accuracy", "exact_match", "f1") if any(m in scores for scores in models.values())]
    rows = [
        [labels[model], model] + [_with_interval(scores.get(m), intervals.get(model, {}).get(m)) for m in metrics]
        for model, scores in models.items()
    ]
    blocks = [
        f"{stats.get('examples', '?')} held-out examples of {stats.get('data', '?')}; 95% intervals in brackets "
        "(Wilson for a share of examples, bootstrap for F1).",
        _metrics_plot({labels[model]: scores for model, scores in models.items()}, metrics),
        Table(["role", "model"] + metrics, rows),
    ]
    margin = stats.get("margin")
    if margin:
        blocks.append(
            f"Margin over the best baseline ({margin['role']}: {margin['over']}): {margin['value']:+.3f} "
            f"{margin['metric']}, 95% {margin['low']:+.3f} to {margin['high']:+.3f} (paired bootstrap over "
            "the same examples)."
        )
    return Section("Evaluation", blocks)


def _with_interval(value, interval) -> str:
    """'0.45 [0.36, 0.54]', or the value alone where no interval was recorded."""
    if value is None:
        return ""
    return _number(value) + (f" [{interval[0]:.3g}, {interval[1]:.3g}]" if interval else "")


def _timings(run_dir: Path, run: dict) -> Section:
    """Seconds per stage: from run.json, else from the seconds each stage wrote in its stats.json."""
    stages = {stage: dict(info) for stage, info in (run.get("stages") or {}).items()}
    for stage in STAGES:
        stats = _read_json(run_dir / stage / "stats.json") or {}
        seconds = stats.get("seconds", (stats.get("summary") or {}).get("seconds"))
        if stage not in stages and seconds is not None:
            stages[stage] = {"state": "done", "seconds": seconds}
    timed = [(stage, info) for stage, info in _in_stage_order(stages) if info.get("seconds") is not None]
    if not timed:
        return Section("Timings", ["Timings: not run yet."])
    return Section("Timings", [_stages_plot(timed)])


def _not_run(title: str, stage: str, run: dict) -> Section:
    """The section of a stage without output: not run yet, or what run.json says happened to it."""
    state = ((run.get("stages") or {}).get(stage) or {}).get("state")
    messages = {"failed": "failed (see the log)", "running": "running, not finished yet", "skipped": "skipped"}
    return Section(title, [f"{title}: {messages.get(state, 'not run yet')}."])


# Plots: small matplotlib figures, returned as SVG text.


def _datasets_plot(datasets: Counter) -> Plot:
    """Horizontal bars: rows per source dataset, the largest TOP_DATASETS (a bar for the rest would dwarf them)."""
    shown = datasets.most_common(TOP_DATASETS)
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(7, 0.8 + 0.24 * len(shown)), layout="constrained")
        axes = figure.add_subplot()
        names = [_truncate(name, 50) for name, _ in shown][::-1]
        bars = axes.barh(names, [count for _, count in shown][::-1], color="#1565c0")
        axes.bar_label(bars, padding=2, fontsize=8)
        axes.set_xlabel("retrieved rows")
        return Plot("datasets", "Retrieved rows per source dataset", _svg(figure))


def _scores_plot(scores: dict[str, list[float]]) -> Plot:
    """Overlaid histograms of the combined score and its three parts."""
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(7, 2.8), layout="constrained")
        axes = figure.add_subplot()
        values = [v for column in scores.values() for v in column if v is not None]
        low, high = (min(values), max(values)) if values else (0.0, 1.0)
        bins = [low + (high - low) * i / 40 for i in range(41)] if high > low else 10
        for name, column in scores.items():
            column = [v for v in column if v is not None]
            axes.hist(column, bins=bins, histtype="step", linewidth=1.5 if name == "score" else 1, label=name)
        axes.set_xlabel("cosine similarity to the task")
        axes.set_ylabel("rows")
        axes.legend(frameon=False)
        return Plot("scores", "Retrieval score distributions", _svg(figure))


def _statuses_plot(statuses: dict[str, int]) -> Plot:
    """Bars: transformed rows per status (ok, rejected, duplicate, parse_error, then any other)."""
    names = [s for s in STATUS_ORDER if s in statuses] + sorted(set(statuses) - set(STATUS_ORDER))
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(5, 2.6), layout="constrained")
        axes = figure.add_subplot()
        colours = [STATUS_COLOURS.get(name, "#6a1b9a") for name in names]
        bars = axes.bar(names, [statuses[name] for name in names], color=colours)
        axes.bar_label(bars, padding=2, fontsize=8)
        axes.set_ylabel("rows")
        axes.margins(y=0.15)
        return Plot("statuses", "Transform outcomes by status", _svg(figure))


def _loss_plot(losses: list[list[float]]) -> Plot:
    """A line: training loss per step."""
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(7, 2.6), layout="constrained")
        axes = figure.add_subplot()
        steps, values = zip(*losses)
        axes.plot(steps, values, marker="o" if len(steps) <= 50 else None, markersize=3, color="#1565c0")
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_ylim(bottom=0)
        return Plot("loss", "Training loss", _svg(figure))


def _metrics_plot(models: dict[str, dict[str, float]], metrics: list[str]) -> Plot:
    """Grouped bars: one group per metric, one bar per model (base, student, ...)."""
    width = 0.8 / max(len(models), 1)
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(5, 2.8), layout="constrained")
        axes = figure.add_subplot()
        for index, (label, scores) in enumerate(models.items()):
            positions = [m + (index - (len(models) - 1) / 2) * width for m in range(len(metrics))]
            bars = axes.bar(positions, [scores.get(m, 0.0) for m in metrics], width, label=label)
            axes.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
        axes.set_xticks(range(len(metrics)), metrics)
        axes.set_ylim(0, 1.1)
        axes.legend(frameon=False, loc="upper left", ncols=len(models))
        return Plot("metrics", "Base vs student on the held-out examples", _svg(figure))


def _stages_plot(stages: list[tuple[str, dict]]) -> Plot:
    """Horizontal bars: seconds per stage, coloured by state, labelled with the duration."""
    with matplotlib.rc_context(_PLOT_STYLE):
        figure = Figure(figsize=(7, 0.8 + 0.3 * len(stages)), layout="constrained")
        axes = figure.add_subplot()
        names = [stage for stage, _ in stages][::-1]
        seconds = [float(info["seconds"]) for _, info in stages][::-1]
        colours = [STATE_COLOURS.get(info.get("state"), "#6a1b9a") for _, info in stages][::-1]
        bars = axes.barh(names, seconds, color=colours)
        axes.bar_label(bars, labels=[_duration(s) for s in seconds], padding=2, fontsize=8)
        axes.set_xlabel("seconds")
        axes.margins(x=0.12)
        return Plot("stages", "Time per stage", _svg(figure))


def _svg(figure: Figure) -> str:
    """The figure as SVG markup, without the XML prologue (so it can be inlined in HTML)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


# Renderers.


def _markdown(title: str, sections: list[Section]) -> str:
    """Markdown with plots as `report/NAME.svg` images; cell text is HTML-escaped for viewers that allow HTML."""
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Plot):
                lines += [f"![{block.title}](report/{block.name}.svg)", ""]
            elif isinstance(block, Headline):
                lines += [f"**{html.escape(block.text, quote=False)}**", ""]
            elif isinstance(block, Table):
                lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
                lines.append("|" + "---|" * len(block.headers))
                lines += ["| " + " | ".join(_md_cell(cell) for cell in row) + " |" for row in block.rows]
                lines.append("")
            else:
                lines += [html.escape(block, quote=False), ""]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", "<br>")


_CSS = """
body { font-family: system-ui, sans-serif; color: #212121; background: #fff; margin: 0; }
main { max-width: 60rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
table.wrap { width: 100%; table-layout: fixed; font-size: 0.8rem; }
table.wrap td { white-space: pre-wrap; overflow-wrap: anywhere; }
p.headline { font-size: 1.25rem; font-weight: 600; margin: 0.4rem 0 0.8rem; }
figure { margin: 0.8rem 0; }
figure svg { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85rem; color: #616161; }
"""

# Counts the plots the browser actually laid out, so a headless browser test can read it from the DOM.
_SCRIPT = """
window.addEventListener("load", () => {
  const drawn = [...document.querySelectorAll("figure.plot svg")].filter((svg) => {
    const box = svg.getBoundingClientRect();
    return box.width > 0 && box.height > 0;
  });
  document.body.dataset.renderedPlots = String(drawn.length);
});
"""


def _html(title: str, sections: list[Section]) -> str:
    """One self-contained HTML page: inline CSS, inline SVG plots, every piece of text escaped."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script>",
        f"</head><body><main><h1>{html.escape(title)}</h1>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Plot):
                parts.append(f'<figure class="plot" id="plot-{block.name}">{block.svg}')
                parts.append(f"<figcaption>{html.escape(block.title)}</figcaption></figure>")
            elif isinstance(block, Headline):
                parts.append(f'<p class="headline">{html.escape(block.text)}</p>')
            elif isinstance(block, Table):
                parts.append('<table class="wrap">' if block.wrap else "<table>")
                parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.headers) + "</tr>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>")
                parts.append("</table>")
            else:
                parts.append(f"<p>{html.escape(block)}</p>")
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


# Small helpers.


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _in_stage_order(stages: dict[str, dict]) -> list[tuple[str, dict]]:
    known = [(stage, stages[stage]) for stage in STAGES if stage in stages]
    return known + [(stage, info) for stage, info in stages.items() if stage not in STAGES]


def _model_label(model: str, roles: dict[str, str]) -> str:
    """The model's role (base, student) when it has a unique one, else its name."""
    role = roles.get(model)
    return role if role and list(roles.values()).count(role) == 1 else f"{role or 'model'}: {Path(model).name}"


def _truncate(text: str, limit: int = VALUE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds) -> str:
    return "" if seconds is None else duration(float(seconds))


def _time(iso: str | None) -> str:
    """An ISO timestamp shown to the second, without the date's T or the time zone's offset."""
    return iso.replace("T", " ")[:19] if iso else ""
