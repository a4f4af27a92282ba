"""The dashboard's trial filter: a small, safe expression language over a DataFrame's columns.

Accepted: column names (a knob also by its bare name: `batch_size` means `param_batch_size`),
literals (numbers, strings, true/false, None, lists of literals for `in`), comparisons
`== != < <= > >= in not in` (chains too: `1 < batch_size <= 8`), and `and`/`or`/`not`
(`&`, `|`, `~` as pandas users type them). Anything else -- calls, attributes, subscripts,
arithmetic, pandas' `@variables` -- is refused with a message.

The text is parsed with Python's `ast` and every node is checked against a whitelist; the
tree is then evaluated here on pandas columns. Nothing the user types is ever passed to
`eval`, `DataFrame.query` or `DataFrame.eval`, which run arbitrary code.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

MAX_CHARS = 500
MAX_NODES = 200

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_LITERAL_NAMES = {"true": True, "false": False, "True": True, "False": False, "None": None}
ALLOWED = "column names, literals, comparisons (== != < <= > >= in, not in) and and/or/not"


class FilterError(ValueError):
    """A filter expression that is refused or cannot be applied; the message says why."""


def filter_frame(frame: pd.DataFrame, text: str) -> pd.DataFrame:
    """The rows of `frame` where the expression `text` holds (NaN compares false)."""
    tree = parse(text)
    mask = _truth(_evaluate(tree.body, frame), frame, "the filter")
    return frame[mask.to_numpy()]


def parse(text: str) -> ast.Expression:
    """The checked syntax tree of `text`; FilterError for anything outside the language."""
    if len(text) > MAX_CHARS:
        raise FilterError(f"longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise FilterError(f"not an expression ({getattr(exc, 'msg', None) or type(exc).__name__})") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise FilterError(f"more than {MAX_NODES} terms")
    for node in nodes:
        _check_node(node)
    return tree


_NODE_TYPES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Invert, ast.USub,
               ast.UAdd, ast.Compare, ast.In, ast.NotIn, ast.Name, ast.Load, ast.Constant, ast.List,
               ast.Tuple, ast.BinOp, ast.BitAnd, ast.BitOr, *_COMPARE)


def _check_node(node: ast.AST) -> None:
    if not isinstance(node, _NODE_TYPES):
        raise FilterError(f"{_describe(node)} is not allowed: only {ALLOWED}")
    if isinstance(node, ast.BinOp) and not isinstance(node.op, (ast.BitAnd, ast.BitOr)):
        raise FilterError(f"arithmetic ({type(node.op).__name__}) is not allowed: only {ALLOWED}")
    if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, bool, type(None))):
        raise FilterError(f"literal {node.value!r} is not allowed")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and not _is_number(node.operand):
        raise FilterError("a sign (+/-) may only precede a number")


def _describe(node: ast.AST) -> str:
    names = {ast.Call: "a function call", ast.Attribute: "an attribute (a.b)", ast.Subscript: "indexing (a[b])",
             ast.Lambda: "lambda", ast.NamedExpr: "assignment (:=)", ast.Starred: "unpacking (*)",
             ast.IfExp: "a conditional (x if c else y)"}
    for kind, name in names.items():
        if isinstance(node, kind):
            return name
    return type(node).__name__


def _is_number(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
        and not isinstance(node.value, bool)


def _evaluate(node: ast.AST, frame: pd.DataFrame) -> Any:
    """A Series (per row) or a plain literal."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _column(node.id, frame)
    if isinstance(node, (ast.List, ast.Tuple)):
        values = [_evaluate(e, frame) for e in node.elts]
        if any(isinstance(v, pd.Series) for v in values):
            raise FilterError("a list after `in` holds literals only")
        return values
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -node.operand.value
        if isinstance(node.op, ast.UAdd):
            return node.operand.value
        return ~_truth(_evaluate(node.operand, frame), frame, "not")
    if isinstance(node, ast.BoolOp):
        return _combine(isinstance(node.op, ast.And), node.values, frame)
    if isinstance(node, ast.BinOp):
        return _combine(isinstance(node.op, ast.BitAnd), [node.left, node.right], frame)
    return _compare(node, frame)


def _combine(conjunction: bool, operands: list[ast.AST], frame: pd.DataFrame) -> pd.Series:
    masks = [_truth(_evaluate(o, frame), frame, "and" if conjunction else "or") for o in operands]
    out = masks[0]
    for mask in masks[1:]:
        out = (out & mask) if conjunction else (out | mask)
    return out


def _compare(node: ast.Compare, frame: pd.DataFrame) -> pd.Series:
    """`a < b <= c` means `a < b and b <= c`, as in Python."""
    left = _evaluate(node.left, frame)
    out = pd.Series(True, index=frame.index)
    for op, right_node in zip(node.ops, node.comparators, strict=True):
        right = _evaluate(right_node, frame)
        out &= _truth(_one_comparison(op, left, right), frame, "a comparison")
        left = right
    return out


def _one_comparison(op: ast.cmpop, left: Any, right: Any) -> Any:
    try:
        if isinstance(op, (ast.In, ast.NotIn)):
            if not isinstance(right, list):
                raise FilterError("`in` needs a list of literals on its right, e.g. quant_bits in [4, 8]")
            hit = left.isin(right) if isinstance(left, pd.Series) else left in right
            return ~hit if isinstance(op, ast.NotIn) else hit
        return _COMPARE[type(op)](left, right)
    except FilterError:
        raise
    except (TypeError, ValueError) as exc:
        raise FilterError(f"cannot compare ({exc})") from None


def _column(name: str, frame: pd.DataFrame) -> Any:
    if name in frame.columns:
        return frame[name]
    if f"param_{name}" in frame.columns:
        return frame[f"param_{name}"]
    if name in _LITERAL_NAMES:
        return _LITERAL_NAMES[name]
    known = ", ".join(str(c) for c in frame.columns[:40])
    raise FilterError(f"no column {name!r} (columns: {known})")


def _truth(value: Any, frame: pd.DataFrame, where: str) -> pd.Series:
    """A boolean Series; NaN/None read as false. A bare literal is refused (it filters nothing)."""
    if not isinstance(value, pd.Series):
        if isinstance(value, bool):
            return pd.Series(value, index=frame.index)
        raise FilterError(f"{where} needs a true/false value per trial, got {value!r}")
    if value.dtype == bool:
        return value
    if all(isinstance(v, (bool, np.bool_)) for v in value.dropna()):
        return value.fillna(False).astype(bool)
    raise FilterError(f"{where} needs a comparison, got the column {value.name!r} of values")
