#!/usr/bin/env python3
"""Write the README's Safety table from the catalogue of hostile inputs (Testing/safety_catalogue.py).

The catalogue is what Testing/test_safety.py runs, case by case; Testing/test_safety.py also fails when the
README's table differs from it, so the table cannot claim what the tests do not check. Run it with the
project's environment after changing the catalogue:  .venv/bin/python scripts/safety_table.py
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))

import safety_catalogue  # noqa: E402  (found through the path above)


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    updated = safety_catalogue.readme_with_table(text)
    if updated == text:
        print("README.md's Safety table is up to date.")
    else:
        readme.write_text(updated, encoding="utf-8")
        print(f"Wrote the Safety table ({len(safety_catalogue.CASES)} cases) into README.md.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
