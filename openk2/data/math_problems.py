"""Math documents: reasoning-gym problems rendered as question + worked answer.

reasoning-gym generates problems offline from a seed. `gsm_symbolic` ships a
chain of thought (GSM8K-style); for the arithmetic and number-theory
generators the worked steps are derived here (Euclid's algorithm, trial
division, one arithmetic operation per line), so the math domain teaches the
steps and not only final answers.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections.abc import Callable, Iterator
from fractions import Fraction

from openk2.errors import DataError


def _fmt(x: Fraction | int | float) -> str:
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


# -- arithmetic, one operation per line ---------------------------------------

_OPS = {
    ast.Add: (lambda a, b: a + b, "+"),
    ast.Sub: (lambda a, b: a - b, "-"),
    ast.Mult: (lambda a, b: a * b, "*"),
    ast.Div: (lambda a, b: a / b, "/"),
}


def _const(node: ast.AST) -> Fraction | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(node.value)
    return None


class _FoldSignedLiterals(ast.NodeTransformer):
    # "-5" parses as USub(5): a literal, not an operation worth a line
    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, (ast.USub, ast.UAdd)) and isinstance(node.operand, ast.Constant):
            v = node.operand.value
            return ast.Constant(-v if isinstance(node.op, ast.USub) else v)
        return node


def _reduce_once(node: ast.AST) -> tuple[ast.AST, str]:
    """Evaluate the leftmost innermost operation; return (new tree, 'a op b = c')."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _const(node.left), _const(node.right)
        if left is not None and right is not None:
            value = _OPS[type(node.op)][0](left, right)
            if value.denominator != 1:
                raise ValueError("non-integer intermediate")
            return ast.Constant(int(value)), f"{_fmt(left)} {_OPS[type(node.op)][1]} {_fmt(right)} = {_fmt(value)}"
        side = "left" if left is None else "right"
        new, step = _reduce_once(getattr(node, side))
        setattr(node, side, new)
        return node, step
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _const(node.operand)
        if inner is not None:  # the sign of a computed value: its own step
            value = -inner if isinstance(node.op, ast.USub) else inner
            sign = "-" if isinstance(node.op, ast.USub) else "+"
            return ast.Constant(int(value)), f"{sign}({_fmt(inner)}) = {_fmt(value)}"
        node.operand, step = _reduce_once(node.operand)
        return node, step
    raise ValueError(f"unsupported expression node {type(node).__name__}")


def arithmetic_steps(expression: str) -> list[str]:
    """['775 * -986 = -764150', ...]: one operation per line, in evaluation order."""
    tree = _FoldSignedLiterals().visit(ast.parse(expression.replace("×", "*").replace("÷", "/"), mode="eval").body)
    steps: list[str] = []
    for _ in range(64):
        if _const(tree) is not None:
            return steps
        tree, step = _reduce_once(tree)
        steps.append(step)
    raise ValueError("expression too long")


# -- number theory ---------------------------------------------------------------


def euclid_steps(a: int, b: int) -> tuple[int, list[str]]:
    a, b = max(a, b), min(a, b)
    steps = []
    while b:
        q, r = divmod(a, b)
        steps.append(f"{a} = {q} × {b} + {r}")
        a, b = b, r
    return a, steps


def factor_steps(n: int) -> tuple[list[int], list[str]]:
    factors, steps, p = [], [], 2
    while p * p <= n:
        while n % p == 0:
            steps.append(f"{n} ÷ {p} = {n // p}")
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        steps.append(f"{n} is prime.")
        factors.append(n)
    return factors, steps


# -- renderers: reasoning-gym entry -> worked solution lines ---------------------


def _gsm_symbolic(e: dict) -> list[str]:
    cot = str(e["metadata"].get("answer_cot", "")).strip()
    lines = [ln for ln in cot.splitlines() if not ln.strip().startswith("####")]
    return lines or [f"The answer is {e['answer']}."]


def _expression(e: dict) -> list[str]:
    expr = e["metadata"]["expression"]
    try:
        steps = arithmetic_steps(expr)
    except (ValueError, SyntaxError, ZeroDivisionError):
        steps = []
    return steps or [f"{expr} = {e['answer']}"]


def _gcd(e: dict) -> list[str]:
    nums = [int(x) for x in e["metadata"]["numbers"]]
    g, lines = nums[0], []
    for x in nums[1:]:
        lines.append(f"Euclid's algorithm on {g} and {x}:")
        g2, steps = euclid_steps(g, x)
        lines += steps
        lines.append(f"gcd({g}, {x}) = {g2}")
        g = g2
    return lines


def _lcm(e: dict) -> list[str]:
    nums = [int(x) for x in e["metadata"]["numbers"]]
    acc, lines = nums[0], []
    for x in nums[1:]:
        g, steps = euclid_steps(acc, x)
        lines += [f"First gcd({acc}, {x}) by Euclid's algorithm:", *steps, f"gcd = {g}"]
        new = acc * x // g
        lines.append(f"lcm({acc}, {x}) = {acc} × {x} ÷ {g} = {new}")
        acc = new
    return lines


def _prime_factorization(e: dict) -> list[str]:
    n = int(e["metadata"]["number"])
    factors, steps = factor_steps(n)
    return ["Divide by the smallest prime that divides what is left:", *steps, f"So {n} = {' × '.join(map(str, factors))}."]


def _fraction_simplification(e: dict) -> list[str]:
    m = e["metadata"]
    num, den = int(m["numerator"]), int(m["denominator"])
    g, steps = euclid_steps(num, den)
    return [
        f"Find gcd({num}, {den}) by Euclid's algorithm:",
        *steps,
        f"gcd = {g}",
        f"{num} ÷ {g} = {num // g} and {den} ÷ {g} = {den // g}",
    ]


def _simple_geometry(e: dict) -> list[str]:
    m = e["metadata"]
    n = int(m["n_sides"])
    known = [float(a) for a in m["known_angles"]]
    total = (n - 2) * 180
    s = sum(known)
    return [
        f"The interior angles of a polygon with {n} sides sum to ({n} - 2) × 180 = {total} degrees.",
        f"The known angles sum to {' + '.join(_fmt(a) for a in known)} = {_fmt(s)}.",
        f"The remaining angle is {total} - {_fmt(s)} = {_fmt(total - s)}.",
    ]


def _simple_equations(e: dict) -> list[str]:
    eq, var, ans = e["metadata"]["equation"], e["metadata"]["variable"], str(e["answer"])
    lhs, rhs = (side.strip() for side in eq.split("="))
    plugged = re.sub(rf"\b{re.escape(var)}\b", f"({ans})", lhs)
    try:
        steps = arithmetic_steps(plugged)
        value = steps[-1].rsplit("= ", 1)[1] if steps else plugged
    except (ValueError, SyntaxError, ZeroDivisionError):
        return [f"{var} = {ans}"]
    return [f"{var} = {ans}.", f"Check: substitute {var} = {ans} into {lhs}:", *steps, f"{value} = {rhs}, so the equation holds."]


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "gsm_symbolic": _gsm_symbolic,
    "basic_arithmetic": _expression,
    "chain_sum": _expression,
    "products": _expression,
    "gcd": _gcd,
    "lcm": _lcm,
    "prime_factorization": _prime_factorization,
    "fraction_simplification": _fraction_simplification,
    "simple_geometry": _simple_geometry,
    "simple_equations": _simple_equations,
}


def render(name: str, entry: dict) -> str:
    solution = RENDERERS[name](entry)
    return f"Problem: {entry['question'].strip()}\n\nSolution:\n" + "\n".join(solution) + f"\n\nAnswer: {entry['answer']}"


def generator_seed(name: str, seed: int) -> int:
    # each generator gets its own stream; str hash() is salted per process, sha256 is not
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big")


def generate(name: str, count: int, seed: int = 0) -> Iterator[tuple[int, str]]:
    """(index, document text) for `count` problems of reasoning-gym generator `name`."""
    if name not in RENDERERS:
        raise DataError(f"math generator {name!r} has no renderer (choose from {', '.join(sorted(RENDERERS))})")
    if count <= 0:
        return
    try:
        import reasoning_gym
    except ModuleNotFoundError as e:
        raise DataError("corpus source 'reasoning_gym' is not installed: pip install 'reasoning-gym>=0.1.25'") from e
    dataset = reasoning_gym.create_dataset(name, size=count, seed=generator_seed(name, seed))
    for index, entry in enumerate(dataset):
        yield index, render(name, entry)


__all__ = ["RENDERERS", "arithmetic_steps", "euclid_steps", "factor_steps", "generate", "render"]
