"""No module of the agent over 800 lines, no function over 80 (issue 19): a module or
a function that size holds more than one concern. `python -m tests.sizes` (part of
`make lint`) exits 1 naming each one over; tests/unit/test_architecture.py runs the
same check. Lines are counted as the file has them, docstrings and comments included.
"""

from __future__ import annotations

import ast
import sys

from tests.importgraph import ROOT, modules

MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80


def oversized(source: str, where: str) -> list[str]:
    """What in one module's source is over the limits, as 'where: what (n lines)'."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"{where}: module ({lines} lines > {MAX_MODULE_LINES})")
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            n = (node.end_lineno or node.lineno) - first + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno}: function {node.name} "
                             f"({n} lines > {MAX_FUNCTION_LINES})")
    return found


def problems() -> list[str]:
    found = []
    for path in sorted(modules().values()):
        found += oversized(path.read_text(), str(path.relative_to(ROOT)))
    return found


def main() -> int:
    found = problems()
    for line in found:
        print(line)
    if found:
        return 1
    print(f"no module over {MAX_MODULE_LINES} lines, no function over {MAX_FUNCTION_LINES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
