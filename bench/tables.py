"""Generated tables in README.md and docs/*.md: no number in the docs is copied by hand.

``python -m bench.tables`` rewrites every marked block from the committed result file it names;
``python -m bench.tables --check`` rewrites nothing and exits 1 listing the blocks that differ
(``tests/bench/test_tables.py`` runs the check). ``make bench`` and ``make experiments`` run it after
writing their results. A block is::

    <!-- table: bench/results/lobpcg.json rows=1-9 columns="provider,n,median_s" notes -->
    (generated: never edit by hand)
    <!-- /table -->

The source is a path from the repository root under ``bench/results/`` or
``bench/experiments/results/``: a ``.json`` written by ``bench.common.write_results`` (``columns``,
``rows``, ``notes``, further ``tables``, ``machine``) or by an experiment (``rows`` only), or a
``.md`` whose pipe tables are read back. The special source ``lorainit.methods`` is the registry's
listing (:func:`lorainit.methods`). Options (``key=value`` or a bare flag, shell-quoted):

* ``table=N``: the N-th table of the file (1-based; JSON: the main table, then ``tables``); default 1.
* ``columns="a,b"``: these columns in this order (names as in the file); default all.
* ``rows=I-J`` (or ``rows=I``): rows I to J of the table, 1-based, inclusive; default all.
* ``digits=N``: significant digits of floats read from JSON (default 3, as ``bench/common.py``);
  Markdown cells are copied as written.
* ``notes``: also the file's notes (JSON ``notes``; Markdown: the paragraphs after the table up to the
  next table or heading, figures left out).
* ``preamble`` (Markdown only): also the paragraphs between the previous heading or table and this
  table (the setup an experiment's file states above its table), its ``Machine:`` line left out.
* ``nosource``: leave out the line naming the file (and machine) below the table.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULT_DIRS = ("bench/results/", "bench/experiments/results/")
METHODS_SOURCE = "lorainit.methods"

BLOCK = re.compile(r"(?P<open><!-- table: (?P<spec>[^\n]*?) -->)\n(?P<body>.*?)(?P<close><!-- /table -->)", re.S)
OPEN = re.compile(r"<!-- table:")
_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")


class TableError(ValueError):
    """A block that cannot be generated: bad options, a missing file, no such table, column or rows."""


@dataclass
class Table:
    columns: List[str]
    rows: List[List[str]]
    notes: List[str] = field(default_factory=list)
    machine: str = ""
    preamble: Optional[List[str]] = None  # Markdown only


# ------------------------------------------------------------------------------------------ formatting
def fmt(value, digits: int = 3) -> str:
    """A JSON cell: floats to ``digits`` significant digits (one decimal from 100 on, exponent
    outside [1e-3, 1e4)), ``None`` and missing as empty, everything else as ``str``."""
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.{digits}g}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.{max(digits - 1, 0)}e}"
    if isinstance(value, (list, dict)):
        raise TableError(f"cell value {value!r} is not a scalar (pick scalar columns with columns=...)")
    return str(value)


def to_markdown(table: Table) -> List[str]:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    return lines


# ------------------------------------------------------------------------------------------ sources
def _machine_line(info: Dict[str, object]) -> str:
    parts = [str(info.get("cpu", "?"))]
    if info.get("cores"):
        parts.append(f"{info['cores']} cores")
    if info.get("torch"):
        parts.append(f"torch {info['torch']}")
    if info.get("gpu"):
        parts.append(str(info["gpu"]))
    if info.get("date"):
        parts.append(str(info["date"]))
    return ", ".join(parts)


def _json_tables(path: Path, digits: int) -> List[Table]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise TableError(f"{path.name}: no 'rows' list in the JSON")
    machine = _machine_line(data["machine"]) if isinstance(data.get("machine"), dict) else ""
    out = []
    for spec in [data, *data.get("tables", [])]:
        rows = spec.get("rows", [])
        columns = spec.get("columns") or [k for k, v in (rows[0] if rows else {}).items()
                                          if not isinstance(v, (list, dict))]
        out.append(Table(list(columns), [[fmt(r.get(c), digits) for c in columns] for r in rows],
                         list(spec.get("notes", [])), machine))
    return out


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _paragraphs(lines: List[str]) -> List[str]:
    """The paragraphs of ``lines`` (blank-line separated, joined into one line each), figures left out."""
    out, para = [], []
    for line in lines + [""]:
        if line.strip():
            para.append(line.strip())
        elif para:
            if not para[0].startswith("!["):
                out.append(" ".join(para))
            para = []
    return out


def _md_tables(path: Path) -> List[Table]:
    lines = path.read_text().splitlines()
    machine = next((ln[len("Machine:"):].strip() for ln in lines if ln.startswith("Machine:")), "")
    tables: List[Table] = []
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and _SEPARATOR.match(lines[i + 1].strip()):
            start = i
            while start > 0 and not lines[start - 1].startswith(("|", "#")):
                start -= 1
            preamble = [p for p in _paragraphs(lines[start:i]) if not p.startswith("Machine:")]
            columns = _cells(lines[i])
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            end = i
            while end < len(lines) and not lines[end].startswith(("|", "#")):
                end += 1
            tables.append(Table(columns, rows, _paragraphs(lines[i:end]), machine, preamble))
        else:
            i += 1
    return tables


def _methods_table() -> Table:
    import lorainit

    rows = []
    for m in lorainit.methods():
        needs = [w for w, flag in (("data", m["needs_data"]), ("gradients", m["needs_grad"]),
                                   ("training steps", m["needs_training"])) if flag]
        rows.append([f"`{m['name']}`", ", ".join(needs) or "-", f"`{m['config']}`", m["summary"], m["paper"]])
    return Table(["method", "needs", "config", "what it does", "paper"], rows)


def load_tables(source: str, *, digits: int = 3, root: Path = ROOT) -> List[Table]:
    """The tables of one source (a result file under ``RESULT_DIRS``, or ``lorainit.methods``)."""
    if source == METHODS_SOURCE:
        return [_methods_table()]
    if not source.startswith(RESULT_DIRS) or Path(source).suffix not in (".json", ".md"):
        raise TableError(f"source {source!r} must be a .json or .md under {' or '.join(RESULT_DIRS)} "
                         f"(or {METHODS_SOURCE!r})")
    path = root / source
    if not path.is_file():
        raise TableError(f"result file {source} does not exist")
    return _json_tables(path, digits) if path.suffix == ".json" else _md_tables(path)


# ------------------------------------------------------------------------------------------ blocks
def _range(text: str, what: str) -> range:
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
        raise TableError(f"{what}={text!r}: expected N or I-J (1-based, I <= J)")
    return range(int(m.group(1)) - 1, int(m.group(2) or m.group(1)))


def render(spec: str, *, root: Path = ROOT) -> str:
    """The body of the block ``<!-- table: {spec} -->`` (ends with a newline)."""
    try:
        words = shlex.split(spec)
    except ValueError as err:
        raise TableError(f"cannot parse {spec!r}: {err}") from None
    if not words:
        raise TableError("empty block: name a result file")
    source, opts, flags = words[0], {}, set()
    for w in words[1:]:
        key, eq, value = w.partition("=")
        if key not in ("table", "columns", "rows", "digits", "notes", "preamble", "nosource"):
            raise TableError(f"unknown option {key!r} (table, columns, rows, digits, notes, preamble, nosource)")
        if bool(eq) != (key in ("table", "columns", "rows", "digits")):
            raise TableError(f"option {key!r}: " + ("needs a value" if not eq else "takes no value"))
        if eq:
            opts[key] = value
        else:
            flags.add(key)
    if not opts.get("digits", "3").isdigit():
        raise TableError(f"digits={opts['digits']!r}: expected a whole number")
    digits = int(opts.get("digits", "3"))
    tables = load_tables(source, digits=digits, root=root)
    index = _range(opts.get("table", "1"), "table").start
    if index >= len(tables):
        raise TableError(f"{source} has {len(tables)} table(s), no table={index + 1}")
    table = tables[index]
    if "columns" in opts:
        wanted = [c.strip() for c in opts["columns"].split(",") if c.strip()]
        missing = [c for c in wanted if c not in table.columns]
        if missing:
            raise TableError(f"{source}: no column(s) {missing}; columns: {table.columns}")
        idx = [table.columns.index(c) for c in wanted]
        table = Table(wanted, [[row[i] if i < len(row) else "" for i in idx] for row in table.rows],
                      table.notes, table.machine, table.preamble)
    if "rows" in opts:
        span = _range(opts["rows"], "rows")
        if span.stop > len(table.rows):
            raise TableError(f"{source}: rows={opts['rows']} but the table has {len(table.rows)} rows")
        table = Table(table.columns, table.rows[span.start:span.stop], table.notes, table.machine, table.preamble)
    lines = [""]
    if "preamble" in flags:
        if table.preamble is None:
            raise TableError(f"{source}: preamble is for Markdown results (a JSON result has notes only)")
        for para in table.preamble:
            lines += [para, ""]
    lines += to_markdown(table)
    if "nosource" not in flags:
        where = f"`{source}`" if source != METHODS_SOURCE else "`lorainit.methods()`"
        line = f"Generated from {where}" + (f"; machine: {table.machine}" if table.machine else "")
        lines += ["", line if line.endswith(".") else line + "."]
    if "notes" in flags:
        for note in table.notes:
            lines += ["", note]
    return "\n".join(lines + [""]) + "\n"


def _fenced_spans(text: str) -> List[range]:
    """Character ranges of fenced code blocks (a block shown as an example there is not a block)."""
    spans, start, pos, fence = [], 0, 0, None
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            fence, start = stripped[:3], pos
        elif fence is not None and stripped.startswith(fence):
            spans.append(range(start, pos + len(line)))
            fence = None
        pos += len(line)
    if fence is not None:
        spans.append(range(start, pos))
    return spans


def refresh_text(text: str, *, where: str = "", root: Path = ROOT) -> str:
    """``text`` with every block regenerated (TableError names ``where`` and the block's line);
    blocks inside fenced code are examples and stay as written."""
    fenced = _fenced_spans(text)
    matched = {m.start() for m in BLOCK.finditer(text)}
    for m in OPEN.finditer(text):
        if m.start() not in matched and not any(m.start() in span for span in fenced):
            line = text.count("\n", 0, m.start()) + 1
            raise TableError(f"{where}:{line}: a table block must be '<!-- table: FILE [options] -->' on one line, "
                             f"then a newline, and end with '<!-- /table -->'")

    def sub(m: re.Match) -> str:
        if any(m.start() in span for span in fenced):
            return m.group(0)
        try:
            body = render(m.group("spec"), root=root)
        except (TableError, OSError, json.JSONDecodeError) as err:
            line = text.count("\n", 0, m.start()) + 1
            raise TableError(f"{where}:{line}: <!-- table: {m.group('spec')} -->: {err}") from None
        return f"{m.group('open')}\n{body}{m.group('close')}"

    return BLOCK.sub(sub, text)


def documents(root: Path = ROOT) -> List[Path]:
    """README.md and every page under docs/."""
    return [p for p in [root / "README.md", *sorted((root / "docs").rglob("*.md"))] if p.is_file()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    parser.add_argument("files", nargs="*", type=Path, help="documents (default: README.md and docs/**/*.md)")
    args = parser.parse_args(argv)
    stale = []
    for path in args.files or documents():
        text = path.read_text()
        try:
            new = refresh_text(text, where=str(path))
        except TableError as err:
            print(f"bench.tables: {err}", file=sys.stderr)
            return 2
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if stale:
        verb = "stale (run python -m bench.tables)" if args.check else "refreshed"
        print(f"bench.tables: {verb}: " + ", ".join(str(p) for p in stale), file=sys.stderr if args.check else sys.stdout)
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
