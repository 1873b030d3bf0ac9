"""setuptools takes everything from pyproject.toml; this adds the one thing it cannot say there.

The shipped models live once, at the repository root in models/ (where the Slicer extension's CMakeLists.txt copies
them from, beside models/README.md and the training script). A wheel needs them inside the package: build_py copies
their files into the wheel as SegmentMBTFELib/shipped_models/, where SegmentMBTFELib/models/shipped.py looks in an
installed package. An editable install needs no copy: it finds models/ itself.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODELS = Path(__file__).resolve().parent / "models"
# What a model folder needs to run, and its card (data, licence, results); not its training log or plots.
MODEL_FILES = ("*/*.json", "*/MODEL_CARD.md", "*/fold_*/checkpoint_final.pth")


class BuildWithShippedModels(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "SegmentMBTFELib" / "shipped_models"
        shutil.rmtree(target, ignore_errors=True)  # a build folder left from an earlier build keeps no stale model
        for pattern in MODEL_FILES:
            for source in MODELS.glob(pattern):
                destination = target / source.relative_to(MODELS)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, destination)


setup(cmdclass={"build_py": BuildWithShippedModels})
