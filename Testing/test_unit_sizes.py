"""Files you can read top to bottom (DESIGN.md, Habits): no product file over 500 lines, and no function over 60
lines unless its docstring says why, in a sentence starting "Long because".
"""
import ast
from pathlib import Path

PRODUCT = Path(__file__).resolve().parents[1] / "SegmentMBTFE"
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60


def test_no_product_file_over_500_lines():
    long = [f"{path.relative_to(PRODUCT)}: {count} lines" for path in sorted(PRODUCT.rglob("*.py"))
            if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES]
    assert not long, "split these files:\n" + "\n".join(long)


def test_no_function_over_60_lines_without_a_reason():
    long = []
    for path in sorted(PRODUCT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(PRODUCT)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "shorten these functions, or say why in their docstring:\n" + "\n".join(long)
