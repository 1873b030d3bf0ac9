"""A Slicer Python without torch, and a slow local package index with a fake torch, for install tests.

- `fake_slicer_python(folder)`: a venv whose site-packages shows this environment's packages (symlinks: they
  are used, never written) minus torch and everything built on it, with numpy as a hard-linked copy (so a pip
  that wrongly replaced it would change only the copy). Its bin/ holds `PythonSlicer`, a launcher that
  starts the real Python as its child, as Slicer's does (killing the launcher leaves that Python running).
- `build_index(folder)`: wheels pip really installs: torch 2.2.0 (with a few MB of payload, so the served
  download takes seconds) and torchvision 0.17.0 (needs torch==2.2.0); `import torch` appends the importing
  process's pid to $FAKE_TORCH_MARKS. A second index, "greedy", offers torch 2.3.0 that wants numpy<1
  (and a fake numpy 0.1): what a pip without constraints would replace Slicer's numpy for.
- `serve(folder, bytes_per_second)`: a local HTTP server giving pip the folder as --find-links, slowly.
"""
import base64
import hashlib
import http.server
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

HIDDEN = ("torch", "torchvision", "torchaudio", "functorch", "torchgen", "nvidia", "triton", "light_the_torch")
COPIED = ("numpy",)   # hard-linked, not symlinked: pip may remove these (only when a test's feature is broken)
# Slicer's PythonSlicer: the launcher stand-in (standins/python_slicer.py) with this venv's python as the real one
LAUNCHER = """#!/bin/sh
SEGMENTMBTFE_TEST_PYTHON_REAL="$(dirname "$0")/python" exec {python} {launcher} "$@"
"""
TORCH_INIT = """import os
__version__ = {version!r}
if os.environ.get("FAKE_TORCH_MARKS"):
    with open(os.environ["FAKE_TORCH_MARKS"], "a") as marks:
        marks.write(f"{{os.getpid()}}\\n")
"""


def _name(entry: str) -> str:
    """'torch-2.13.0.dist-info' -> 'torch'; 'numpy.libs' -> 'numpy'."""
    return entry.split("-")[0].split(".")[0].lower()


def fake_slicer_python(folder: Path) -> Path:
    """The venv's python; bin/PythonSlicer next to it."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next((folder / "lib").glob("python3*")) / "site-packages"
    here = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "numpy").is_dir()))
    for entry in os.listdir(here):
        name = _name(entry)
        if any(name == h or name.startswith(h + "_") for h in HIDDEN) or entry == "__pycache__":
            continue
        if name in COPIED:
            source = here / entry
            if source.is_dir():
                shutil.copytree(source, site / entry, copy_function=os.link, symlinks=True)
            else:
                os.link(source, site / entry)
        else:
            (site / entry).symlink_to(here / entry)
    python = folder / "bin" / "python"
    launcher = folder / "bin" / "PythonSlicer"
    stand_in = Path(__file__).resolve().parents[1] / "standins" / "python_slicer.py"
    launcher.write_text(LAUNCHER.format(python=shlex.quote(sys.executable), launcher=shlex.quote(str(stand_in))))
    launcher.chmod(0o755)
    return python


def wheel(folder: Path, name: str, version: str, files: dict, requires=()) -> Path:
    """A pure-Python wheel with `files` (path -> bytes or text), installable by pip."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    contents = dict(files)
    contents[f"{dist_info}/METADATA"] = metadata
    contents[f"{dist_info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: fake\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in contents.items():
        data = data.encode() if isinstance(data, str) else data
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
        contents[path] = data
    contents[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for member, data in contents.items():
            archive.writestr(member, data)
    return path


def torch_wheel(folder: Path, version: str, requires=(), payload_mb: float = 3.0) -> Path:
    return wheel(folder, "torch", version, {"torch/__init__.py": TORCH_INIT.format(version=version),
                                            "torch/payload.bin": os.urandom(int(payload_mb * 2 ** 20))}, requires)


def build_index(folder: Path) -> dict:
    """{'normal': folder, 'greedy': folder} of wheels."""
    normal, greedy = folder / "normal", folder / "greedy"
    for index in (normal, greedy):
        index.mkdir(parents=True)
    torch_wheel(normal, "2.2.0")
    torch_wheel(normal, "2.1.0", payload_mb=0.1)   # what an old install had
    wheel(normal, "torchvision", "0.17.0", {"torchvision/__init__.py": "__version__ = '0.17.0'\n"}, ["torch==2.2.0"])
    wheel(normal, "torchvision", "0.16.0", {"torchvision/__init__.py": "__version__ = '0.16.0'\n"}, ["torch==2.1.0"])
    torch_wheel(greedy, "2.3.0", ["numpy<1"], payload_mb=0.1)
    wheel(greedy, "torchvision", "0.18.0", {"torchvision/__init__.py": "__version__ = '0.18.0'\n"}, ["torch==2.3.0"])
    wheel(greedy, "numpy", "0.1.0", {"numpy/__init__.py": "__version__ = '0.1.0'\n"})
    return {"normal": normal, "greedy": greedy}


class _SlowHandler(http.server.SimpleHTTPRequestHandler):
    bytes_per_second = 1 << 20

    def log_message(self, *args):
        pass

    def copyfile(self, source, output):
        chunk = max(1, self.bytes_per_second // 20)
        while True:
            data = source.read(chunk)
            if not data:
                return
            output.write(data)
            time.sleep(0.05)


def serve(folder: Path, bytes_per_second: int = 1 << 20):
    """(url, server): the folder's listing is a --find-links page; server.shutdown() stops it."""
    handler = type("Handler", (_SlowHandler,), {"bytes_per_second": bytes_per_second})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *args: handler(*args, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server
