"""The results page (docs/results.md) and the README's short table, written from the JSON results.

Nothing here holds a number: each row (headlines.py) names a result file and how to read its
headline from it, and the page is rewritten from whatever the files say, with the command,
machine and date each file records. `run_all.py` calls `write_all` after every `make bench`;
`python experiments/benchmarks/results_page.py` rewrites both from the files alone.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
REPO = HERE.parents[1]
PAGE = REPO / "docs" / "results.md"
README = REPO / "README.md"
# benchmark pictures copied to docs/images/ with the page: result file -> the page's name
PICTURES = {"full/pareto.png": "pareto.png"}
# The README's table lives between these two lines; everything else in the README is left as is.
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load_module(name: str):
    # by path: this file runs as a script, and as a module of run_all.py and of its tests,
    # neither of which has this folder on sys.path
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_headlines = _load_module("headlines")
Row, ROWS = _headlines.Row, _headlines.ROWS
# Pages that show a result's own tables between two marker lines, written from its JSON:
# (page, marker name, result file, the function that renders the block)
_distill_tables = _load_module("distill_tables").all_tables
_pareto_tables = _load_module("pareto_tables").all_tables
BLOCKS = [
    (REPO / "docs" / "distill.md", "distill", "distill.json", _distill_tables),
    (REPO / "docs" / "distill.md", "distill-300", "distill_300_steps.json", _distill_tables),
    (REPO / "docs" / "distill.md", "distill-heldout8", "distill_heldout8.json", _distill_tables),
    (REPO / "docs" / "distill.md", "distill-weights", "distill_weights.json", _distill_tables),
    (REPO / "docs" / "pareto.md", "pareto", "pareto.json", _pareto_tables),
    (REPO / "docs" / "pareto.md", "pareto-full", "full/pareto.json", _pareto_tables),
]


# -- provenance: what each file records of how it was made (the files differ in their keys)


def _command(d: dict, summary_row: dict | None) -> str:
    command = d.get("command") or (summary_row or {}).get("command") or ""
    # some scripts recorded their own absolute path: show the command as run from the repo
    m = re.match(r"^(?:python\s+)?\S*?(experiments/benchmarks/\S+)(.*)$", command)
    command = f"python {m[1]}{m[2]}" if m else command
    # an --out into another machine's folder (a GPU lease's) is no part of how to re-run it
    return re.sub(r" --out /\S+", "", command)


def _machine(d: dict) -> str:
    m = d.get("machine") or {}
    gpu = d.get("gpu") or m.get("gpu")
    torch = m.get("torch") or d.get("torch")
    if gpu:
        return f"{gpu}" + (f", torch {torch.split('+')[0]}" if torch else "")
    cores = m.get("cores") or m.get("cpus") or m.get("cpu_count")
    threads = m.get("torch_threads") or m.get("threads") or d.get("threads")
    loads = [
        m.get("load_1min"),
        m.get("load_1min_at_start"),
        (d.get("loadavg_start") or [None])[0],
        ((d.get("load") or {}).get("loadavg_before") or [None])[0],
    ]
    load = next((x for x in loads if x is not None), None)
    parts = [f"{cores}-core CPU" if cores else "CPU"]
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    if load is not None:
        parts.append(f"load {load:.1f}")
    return ", ".join(parts)


def _date(d: dict, summary_row: dict | None) -> str:
    when = d.get("created") or d.get("date") or (summary_row or {}).get("created") or ""
    return when[:16].replace("T", " ") or "—"


def _summary_rows(results: Path) -> dict[str, dict]:
    """run_all.py's rows by result file: the command and time of files that record neither."""
    rows: dict[str, dict] = {}
    for path in sorted(results.rglob("summary.json")):
        folder = path.parent.relative_to(results)
        for row in json.loads(path.read_text()).get("benchmarks", []):
            rows[str(folder / f"{row['benchmark']}.json")] = row
    return rows


def _load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(row: Row, d: dict) -> str:
    if row.met is None:
        return ""
    return "met" if row.met(d) else "**missed**"


def _value(row: Row, d: dict) -> str:
    try:
        return row.value(d)
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"results/{row.file} has no {e} for the row {row.what!r}: re-run its benchmark "
            f"or change the row in experiments/benchmarks/results_page.py"
        ) from e


def render_page(rows: list[Row] = ROWS, results: Path = RESULTS) -> str:
    summary = _summary_rows(results)
    out = [
        "# Results",
        "",
        "<!-- written by experiments/benchmarks/run_all.py from experiments/benchmarks/results/"
        "*.json: edit the benchmarks or experiments/benchmarks/results_page.py, not this page -->",
        "",
        "Every number on this page is read from a JSON file in `experiments/benchmarks/results/`"
        " when `make bench` (or `python experiments/benchmarks/results_page.py`) runs; each row"
        " gives the command that wrote it, the machine and the date the file records. Targets"
        " are in brackets, and *missed* says a result fell short of its target. Timings move"
        " with the machine's load, which is shown where the file recorded it.",
    ]
    used: set[str] = set()
    for area in dict.fromkeys(r.area for r in rows):
        out += ["", f"## {area}", ""]
        out += ["| what | result | target | command | machine | date |", "|---" * 6 + "|"]
        for row in (r for r in rows if r.area == area):
            used.add(row.file)
            d = _load(results, row.file)
            if d is None:
                cells = [row.what, f"not measured yet (no `results/{row.file}`)", "", "", "", ""]
            else:
                s = summary.get(row.file)
                cells = [
                    row.what,
                    _value(row, d),
                    _verdict(row, d),
                    f"`{_command(d, s)}`",
                    _machine(d),
                    _date(d, s),
                ]
            out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    others = [
        p
        for p in sorted(results.rglob("*.json"))
        if str(p.relative_to(results)) not in used and p.name != "summary.json"
    ]
    listed = []
    for path in others:
        d = json.loads(path.read_text())
        if not isinstance(d, dict) or "command" not in d:  # raw timing caches of a benchmark
            continue
        name = str(path.relative_to(results))
        s = summary.get(name)
        note = f" Superseded: {d['superseded']}" if d.get("superseded") else ""
        listed.append(
            f"| `{name}` | `{_cell(_command(d, s))}` | {_machine(d)} | {_date(d, s)} |"
            f" {_cell(note.strip())} |"
        )
    if listed:
        out += [
            "",
            "## Other result files",
            "",
            "Ablations, earlier protocols and runs the tables above do not quote, with what"
            " each file says of itself.",
            "",
            "| file | command | machine | date | note |",
            "|---|---|---|---|---|",
            *listed,
        ]
    return "\n".join(out) + "\n"


def _anchor(area: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", area.lower()).strip().replace(" ", "-")


def _short(command: str, width: int = 70) -> str:
    """A command for the README's narrow table: whole up to `width` characters, else its
    script and the first options that fit, then "…" (the results page gives it whole)."""
    if len(command) <= width:
        return command
    kept = ""
    for word in command.split(" "):
        if len(kept) + len(word) + 1 > width - 2:
            break
        kept = f"{kept} {word}".strip()
    return f"{kept} …"


def render_readme_table(
    rows: list[Row] = ROWS, results: Path = RESULTS, page: str = "docs/results.md"
) -> str:
    chosen = [r for r in rows if r.readme]
    if len(chosen) > 15:
        raise ValueError(f"{len(chosen)} rows marked readme=True: the README's table keeps 15")
    summary = _summary_rows(results)
    out = ["| what | result | command |", "|---|---|---|"]
    for row in chosen:
        d = _load(results, row.file)
        link = f"[details]({page}#{_anchor(row.area)})"
        if d is None:
            result = "not measured yet"
            command = ""
        else:
            verdict = _verdict(row, d)
            result = _value(row, d) + (f" ({verdict})" if verdict else "")
            command = f"`{_short(_command(d, summary.get(row.file)))}`"
        out.append(f"| {_cell(row.what)} ({link}) | {_cell(result)} | {_cell(command)} |")
    return "\n".join(out) + "\n"


def replace_block(text: str, table: str, marker: str = "results", where: str = "the README") -> str:
    """`text` with what lies between the `marker` lines (<!-- results:start --> and
    <!-- results:end -->) replaced by `table`."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{where} needs one {start} line followed by one {end} line")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{table}{end}{tail}"


def render_blocks(results: Path = RESULTS) -> dict[Path, str]:
    """Each page of BLOCKS with its block rewritten from its result file."""
    pages: dict[Path, str] = {}
    for path, marker, name, render in BLOCKS:
        d = _load(results, name)
        if d is not None and path.is_file():
            text = pages.get(path) or path.read_text()
            pages[path] = replace_block(text, render(d), marker, str(path))
    return pages


def write_all(
    rows: list[Row] = ROWS, results: Path = RESULTS, page: Path = PAGE, readme: Path = README
) -> None:
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(render_page(rows, results))
    print(f"wrote {page}")
    for source, name in PICTURES.items():  # the README shows them; results/ PNGs stay out of git
        if (results / source).is_file():
            (page.parent / "images").mkdir(exist_ok=True)
            shutil.copyfile(results / source, page.parent / "images" / name)
    if readme.is_file():  # a benchmark folder outside a checkout (the driver's tests) has none
        readme.write_text(replace_block(readme.read_text(), render_readme_table(rows, results)))
        print(f"wrote the results table of {readme}")
    for path, text in render_blocks(results).items():
        path.write_text(text)
        print(f"wrote the result tables of {path}")


if __name__ == "__main__":
    write_all()
