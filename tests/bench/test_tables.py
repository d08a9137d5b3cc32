"""bench.tables: the generated tables in README.md and docs/ match the committed result files, and
the tool reads JSON and Markdown results, selects tables, columns and rows, and names what is wrong."""
import json

import pytest

from bench import tables


def test_committed_blocks_match_the_result_files():
    stale = []
    for doc in tables.documents():
        text = doc.read_text()
        if tables.refresh_text(text, where=str(doc)) != text:
            stale.append(str(doc.relative_to(tables.ROOT)))
    assert not stale, f"generated tables differ from the result files in {stale}: run python -m bench.tables"


def test_every_document_with_numbers_has_blocks():
    # README and the benchmark/experiment pages carry their tables as generated blocks
    names = {p.name for p in tables.documents() if tables.BLOCK.search(p.read_text())}
    assert {"README.md", "benchmarks.md", "experiments.md"} <= names


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_json_columns_rows_notes_and_machine(tmp_path):
    result = {"machine": {"cpu": "CPU X", "cores": 2, "torch": "2.13", "date": "2026-12-07"},
              "title": "t", "columns": ["name", "s", "ratio", "err"],
              "rows": [{"name": "a", "s": 0.123456, "ratio": 148.123, "err": 1.6803e-7},
                       {"name": "b", "s": 12345.6, "ratio": 1.0, "err": None},
                       {"name": "c", "s": 0.0, "ratio": 2, "err": "-"}],
              "notes": ["first note", "second note"],
              "tables": [{"title": "u", "columns": ["k"], "rows": [{"k": 7}], "notes": []}]}
    _write(tmp_path, "bench/results/x.json", json.dumps(result))
    body = tables.render('bench/results/x.json columns="ratio,name,err" rows=1-2 notes', root=tmp_path)
    assert body == ("\n| ratio | name | err |\n|---|---|---|\n| 148.1 | a | 1.68e-07 |\n| 1 | b |  |\n\n"
                    "Generated from `bench/results/x.json`; machine: CPU X, 2 cores, torch 2.13, 2026-12-07.\n\n"
                    "first note\n\nsecond note\n\n")
    assert tables.render("bench/results/x.json table=2 nosource", root=tmp_path) == "\n| k |\n|---|\n| 7 |\n\n"
    assert "| 0.1235 | 1.235e+04 |" in tables.render("bench/results/x.json digits=4 columns=s rows=1-2", root=tmp_path) \
        .replace(" |\n| ", " | ")


def test_markdown_nth_table_with_its_notes_and_no_figures(tmp_path):
    md = ("### A\n\nMachine: CPU Y, 2 cores\n\nsetup of A,\non two lines\n\n| a | b |\n|---|---|\n| 1 | x |\n\nnote of A\n\n"
          "### B\n\n| c |\n|---|\n| 2.0 |\n| 3.5 |\n\nnote of B,\ntwo lines\n\n![fig](b.png)\n\nlast\n")
    _write(tmp_path, "bench/experiments/results/y.md", md)
    body = tables.render("bench/experiments/results/y.md table=2 rows=2 notes", root=tmp_path)
    assert body == ("\n| c |\n|---|\n| 3.5 |\n\nGenerated from `bench/experiments/results/y.md`; "
                    "machine: CPU Y, 2 cores.\n\nnote of B, two lines\n\nlast\n\n")
    body = tables.render("bench/experiments/results/y.md preamble nosource columns=b", root=tmp_path)
    assert body == "\nsetup of A, on two lines\n\n| b |\n|---|\n| x |\n\n"


def test_refresh_replaces_a_stale_body_and_check_mode_reports_it(tmp_path, capsys):
    doc = _write(tmp_path, "doc.md", "intro\n<!-- table: bench/results/svd_product.json -->\n| old | 1 |\n"
                                     "<!-- /table -->\nend\n")
    before = doc.read_text()
    assert tables.main(["--check", str(doc)]) == 1
    assert doc.read_text() == before and "stale" in capsys.readouterr().err
    assert tables.main([str(doc)]) == 0
    after = doc.read_text()
    assert after.startswith("intro\n<!-- table: bench/results/svd_product.json -->\n\n| provider |")
    assert after.endswith("<!-- /table -->\nend\n") and "| old | 1 |" not in after
    assert tables.main(["--check", str(doc)]) == 0


def test_blocks_in_fenced_code_are_examples_and_unclosed_blocks_are_errors(tmp_path):
    example = "```\n<!-- table: bench/results/nothing.json -->\n<!-- /table -->\n```\n"
    assert tables.refresh_text(example, root=tmp_path) == example
    with pytest.raises(tables.TableError, match="page.md:2: a table block must be"):
        tables.refresh_text("text\n<!-- table: bench/results/x.json -->\nno end\n", where="page.md", root=tmp_path)


def test_methods_block_lists_every_registered_method():
    import lorainit

    body = tables.render("lorainit.methods")
    for m in lorainit.methods():
        assert f"| `{m['name']}` |" in body and m["config"] in body


@pytest.mark.parametrize("spec, message", [
    ("bench/results/none.json", "does not exist"),
    ("README.md", "must be a .json or .md under"),
    ("bench/results/x.json columns=nope", "no column(s) ['nope']"),
    ("bench/results/x.json rows=2-3", "the table has 1 rows"),
    ("bench/results/x.json rows=3-2", "expected N or I-J"),
    ("bench/results/x.json table=2", "has 1 table(s), no table=2"),
    ("bench/results/x.json colour=red", "unknown option 'colour'"),
    ("bench/results/x.json notes=yes", "takes no value"),
    ("bench/results/x.json digits=x", "expected a whole number"),
    ("bench/results/x.json preamble", "preamble is for Markdown results"),
])
def test_bad_blocks_are_errors_naming_the_problem(tmp_path, spec, message):
    _write(tmp_path, "bench/results/x.json", json.dumps({"columns": ["a"], "rows": [{"a": 1}]}))
    text = f"line 1\nline 2\n<!-- table: {spec} -->\n<!-- /table -->\n"
    with pytest.raises(tables.TableError) as err:
        tables.refresh_text(text, where="page.md", root=tmp_path)
    assert message in str(err.value) and str(err.value).startswith("page.md:3:")
