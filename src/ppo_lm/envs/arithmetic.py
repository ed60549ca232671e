"""``ppo_lm/arithmetic``: compute an expression, with a calculator the model may call first.

The policy replies ``answer: N`` to end the episode (reward 1 when N is right) or ``calc: EXPRESSION`` to use
the calculator (the environment replies ``= VALUE``). A reply with neither gets the rules again; with
``strict=False`` its last number is taken as the answer instead (a chat model that writes "99 + 95 = 194." is
then scored on its arithmetic rather than on the format). The
calculator reads whole numbers, ``+ - *`` and parentheses, nothing else (it never runs ``eval``).
"""

from __future__ import annotations

import ast
import operator
import re

from . import TextEnv

ANSWER = re.compile(r"answer\s*:?\s*(-?\d{1,30})", re.IGNORECASE)
NUMBER = re.compile(r"-?\d{1,30}")
CALC = re.compile(r"calc\s*:?\s*([-+*()\d\s]+)", re.IGNORECASE)
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def calculate(expression: str, limit: int = 10 ** 12) -> int:
    """The value of a whole-number expression of ``+ - *`` and parentheses; ValueError for anything else, or for a
    value (or an intermediate one) beyond ``limit``."""
    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            result = node.value
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            result = -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            result = OPERATORS[type(node.op)](value(node.left), value(node.right))
        else:
            raise ValueError("only whole numbers, + - * and parentheses")
        if abs(result) > limit:
            raise ValueError("too large")
        return result

    if len(expression) > 200:
        raise ValueError("too long")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError("not an expression") from e
    return value(tree.body)


class Arithmetic(TextEnv):
    """Questions ``a OP b`` with ``digits``-digit operands and OP drawn from ``ops``; ``reward`` for a right
    answer, ``calc_cost`` taken per calculator call (0: the calculator is free)."""

    def __init__(self, digits: int = 2, ops: str = "+-*", reward: float = 1.0, calc_cost: float = 0.0,
                 strict: bool = True):
        if digits < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError("digits >= 1 and ops from '+-*'")
        self.digits, self.ops, self.reward, self.calc_cost = digits, ops, reward, calc_cost
        self.strict = strict
        self.question, self.value = "", 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits
        a, b = (int(self.np_random.integers(lo, hi)) for _ in range(2))
        op = self.ops[int(self.np_random.integers(len(self.ops)))]
        self.question = f"{a} {op} {b}"
        self.value = calculate(self.question)
        return (f"What is {self.question}? Reply answer: NUMBER. You may first use the calculator: reply "
                f"calc: EXPRESSION."), {"question": self.question}

    def step(self, action: str):
        answer, calc = ANSWER.search(action), CALC.search(action)
        numbers = NUMBER.findall(action)
        if answer is None and calc is None and not self.strict and numbers:
            right = int(numbers[-1]) == self.value
            return "", self.reward if right else 0.0, True, False, {"success": right}
        if answer is not None and (calc is None or answer.start() < calc.start()):
            right = int(answer.group(1)) == self.value
            return "", self.reward if right else 0.0, True, False, {"success": right}
        if calc is not None:
            try:
                reply = f"= {calculate(calc.group(1))}"
            except ValueError as e:
                reply = f"The calculator cannot read that: {e}."
            return reply, -self.calc_cost, False, False, {"success": False}
        return "Reply answer: NUMBER, or calc: EXPRESSION.", 0.0, False, False, {"success": False}


def optimal_player(observation: str, history: list[tuple[str, str]]) -> str:
    """Ask the calculator, then answer with what it said."""
    if not history:
        return "calc: " + re.search(r"What is (.+?)\?", observation).group(1)
    return f"answer: {history[-1][1].removeprefix('= ')}"
