"""Safe evaluation of the `check` expressions that seed and eval items carry, so a test can
recompute every numeric answer (no `eval`: only numbers, arithmetic and a few math functions)."""

from __future__ import annotations

import ast
import math
import operator
import re

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.Pow: operator.pow, ast.Mod: operator.mod,
        ast.FloorDiv: operator.floordiv, ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS = {"sqrt": math.sqrt, "log": math.log, "exp": math.exp, "round": round, "abs": abs,
          "min": min, "max": max}
_ANSWER = re.compile(r"Answer:\s*(-?\d+(?:\.\d+)?)\s*$")


def evaluate(expr: str) -> float:
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCS and not node.keywords):
            return _FUNCS[node.func.id](*[ev(a) for a in node.args])
        raise ValueError(f"not allowed in a check expression: {ast.dump(node)[:60]}")

    return ev(ast.parse(expr, mode="eval"))


def final_answer(output: str) -> float | None:
    """The number on a calculation's last line, `Answer: <number>`."""
    m = _ANSWER.search(output.strip())
    return float(m.group(1)) if m else None


def matches(value: float, answer: float) -> bool:
    return abs(value - answer) <= 0.01 * max(1.0, abs(answer))
