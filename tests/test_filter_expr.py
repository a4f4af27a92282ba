"""The dashboard's trial filter: a checked expression language, never evaluated as code."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pandas as pd
import pytest

from reports.filter_expr import FilterError, filter_frame

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame({"number": [0, 1, 2, 3, 4], "param_batch_size": [2, 8, 4, 16, 4],
                         "latency_p99_ms": [100.0, 600.0, float("nan"), 300.0, 499.9],
                         "feasible": [True, False, True, True, False],
                         "category": ["pareto", "infeasible", "feasible", "pareto", "infeasible"],
                         "param_quant_scheme": ["weight_only", "fp8", None, "weight_only", "fp8"]})


@pytest.mark.parametrize(("text", "numbers"), [
    ("batch_size >= 4 and latency_p99_ms < 500", [3, 4]),  # bare knob name = its param_ column
    ("param_batch_size >= 4 and latency_p99_ms < 500", [3, 4]),
    ("latency_p99_ms >= 0", [0, 1, 3, 4]),  # NaN compares false
    ("not feasible", [1, 4]),
    ("feasible and not (batch_size == 2)", [2, 3]),
    ("category in ['pareto', 'feasible']", [0, 2, 3]),
    ("category not in ('pareto',)", [1, 2, 4]),
    ("1 < batch_size <= 8", [0, 1, 2, 4]),
    ("(batch_size == 2) | (batch_size == 16)", [0, 3]),
    ("~feasible & (batch_size > 4)", [1]),
    ("batch_size > -1 or latency_p99_ms < 0", [0, 1, 2, 3, 4]),
    ("quant_scheme == 'fp8'", [1, 4]),
    ("quant_scheme == None", []),  # pandas: missing values never equal anything
])
def test_filters_like_the_expression_says(frame, text, numbers):
    assert list(filter_frame(frame, text)["number"]) == numbers


@pytest.mark.parametrize(("text", "why"), [
    ('@os.system("id > /tmp/x")', "not an expression"),
    ('__import__("os").system("id")', "function call"),
    ("batch_size.__class__.__mro__", "attribute"),
    ("category[0] == 'p'", "indexing"),
    ("batch_size + 1 > 2", "arithmetic"),
    ("'a' * 10 ** 9", "arithmetic"),
    ("[c for c in category]", "ListComp"),
    ("(lambda: 1)() == 1", "function call"),
    ("(x := 1) == 1", "assignment"),
    ("batch_size if feasible else 0", "conditional"),
    ("nope > 1", "no column 'nope'"),
    ("category < 5", "cannot compare"),
    ("batch_size", "needs a comparison"),
    ("5", "true/false"),
    ("batch_size in category", "list of literals"),
    ("-category == 1", "sign"),
    ("b'x' == category", "literal"),
    ("(" * 300 + "1" + ")" * 300, "longer than"),
    ("|".join(["x>1"] * 100), "more than"),
    ("batch_size >", "not an expression"),
])
def test_refuses_everything_else_with_a_reason(frame, text, why):
    with pytest.raises(FilterError, match=re.escape(why)):
        filter_frame(frame, text)


def test_an_injection_runs_nothing(frame, tmp_path):
    target = tmp_path / "pwned"
    for text in (f'@__import__("os").system("touch {target}")', f'__import__("os").system("touch {target}") == 0',
                 f'category == open("{target}", "w")', f"feasible and exec('open(\"{target}\",\"w\")')"):
        with pytest.raises(FilterError):
            filter_frame(frame, text)
    assert not target.exists()


def _calls(path: Path, names: set[str]) -> list[str]:
    """`name(` call sites in a source file, by tokens (comments and strings do not count)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
              if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
    return [f"{path.name}:{a.start[0]} {a.string}(" for a, b in zip(tokens, tokens[1:], strict=False)
            if a.type == tokenize.NAME and a.string in names and b.string == "("]


def test_no_query_or_eval_in_the_dashboard_layers():
    """Grep-level: nothing that reads and renders studies (app, reports, tuner) calls
    DataFrame.query/eval, eval or exec; user text reaches only `filter_frame`."""
    sources = [ROOT / "app.py", *(p for d in ("ui", "reports", "tuner") for p in sorted((ROOT / d).rglob("*.py")))]
    found = [hit for path in sources for hit in _calls(path, {"query", "eval", "exec"})]
    assert found == []
    assert "filter_frame(shown, query)" in (ROOT / "ui" / "table.py").read_text()
