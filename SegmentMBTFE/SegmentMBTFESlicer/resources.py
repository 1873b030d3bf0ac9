"""Where the module's resources are: beside the module when installed, at the repository root in a checkout."""
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]


def resource_path(name: str) -> str:
    """Resources/<name>: CMake copies Resources/ beside the module file; a source checkout has it one level up."""
    candidates = [MODULE_DIR / "Resources" / name, MODULE_DIR.parent / "Resources" / name]
    return str(next((path for path in candidates if path.exists()), candidates[0]))
