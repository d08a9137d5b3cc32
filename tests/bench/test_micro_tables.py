"""bench.micro_tables: pytest-benchmark's JSON -> same-run ratios to the lorainit provider."""
import pytest

from bench.micro_tables import rows_from_raw


def _bench(group, provider, median):
    return {"group": group, "name": f"test[{provider}]", "params": {"provider": provider}, "stats": {"median": median}}


def test_ratios_are_to_lorainit_in_the_same_group():
    raw = {"benchmarks": [_bench("a", "torch", 0.3), _bench("a", "lorainit", 0.1), _bench("b", "scipy", 2.0),
                          _bench("b", "lorainit", 4.0), _bench("b", "torch", 1.0)]}
    rows = rows_from_raw(raw)
    got = {(r["op"], r["provider"]): r["time / lorainit's"] for r in rows}
    assert got == {("a", "lorainit"): 1.0, ("a", "torch"): pytest.approx(3.0), ("b", "lorainit"): 1.0,
                   ("b", "scipy"): 0.5, ("b", "torch"): 0.25}
    assert [r["provider"] for r in rows if r["op"] == "b"][0] == "lorainit"  # lorainit first in its group
    assert rows[0]["median_ms"] == pytest.approx(100.0)


def test_a_group_without_lorainit_or_a_provider_is_an_error():
    with pytest.raises(ValueError, match="no 'lorainit' provider"):
        rows_from_raw({"benchmarks": [_bench("a", "torch", 0.3)]})
    with pytest.raises(ValueError, match="no 'provider' parameter"):
        rows_from_raw({"benchmarks": [{"group": "a", "name": "x", "params": {}, "stats": {"median": 1.0}}]})
