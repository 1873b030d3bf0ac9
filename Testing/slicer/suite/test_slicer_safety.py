"""The safety catalogue (Testing/safety_catalogue.py) through the Slicer console API as well as the command line.

Every catalogue case that is one `segment-mbtfe predict` of images with a model (images, DICOM folders and
model folders; not the output, version and multi-process cases, which belong to the command line) is given
to `logic.segmentFiles` in the module, that is to the worker process: a refused case raises the engine's
own error with the very sentence the command line prints after "error: ", writes nothing and leaves the
scene as it was; a case that works writes its .seg.nrrd.
"""
from pathlib import Path

import pytest

import safety_catalogue as catalogue
from slicer_testing import scene_state

pytestmark = pytest.mark.timeout(300)
GROUPS = ("Images", "DICOM", "Model folders")
PASSED_THROUGH = {"-q", "--no-tta"}  # what the console call does anyway (no terminal; tta=False below)


def console_call(args):
    """(images, model) of a plain `predict -m MODEL -i IMAGE... -o OUT`, or None when it asks for more."""
    args = [str(a) for a in args]
    if not args or args[0] != "predict":
        return None
    images, model, i = [], None, 1
    while i < len(args):
        if args[i] in PASSED_THROUGH:
            i += 1
        elif args[i] in ("-m", "-o"):
            model = args[i + 1] if args[i] == "-m" else model
            i += 2
        elif args[i] == "-i":
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                images.append(args[i])
                i += 1
        else:
            return None  # folds, configurations, previous stages...: the command line's own options
    return (images, model) if images and model else None


# Refused only because of the command line's output format (NIfTI cannot hold a shear; segmentFiles writes
# .seg.nrrd, which can): the console writes these.
OUTPUT_FORMAT_CASES = {"sheared_to_nifti"}
CASES = [c for c in catalogue.CASES if c.group in GROUPS and not c.custom and c.name not in OUTPUT_FORMAT_CASES]


@pytest.fixture
def ctx(tmp_path, models, good_image, monkeypatch):
    home, out = tmp_path / "home", tmp_path / "out"
    home.mkdir()
    out.mkdir()
    monkeypatch.setenv("SEGMENTMBTFE_HOME", str(home))
    def command_line_only(args):
        pytest.skip("the case runs the command line itself")
    return catalogue.Context(tmp_path, models, good_image, out, home, command_line_only, command_line_only)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_catalogue_case_through_the_console(case, ctx, module, scene, tmp_path):
    from SegmentMBTFELib.errors import SegmentError
    attempt = case.make(ctx)
    call = console_call(attempt.args) if attempt.prefix is None else None
    if call is None:
        pytest.skip("a command-line-only case (its own options or a command prefix)")
    images, model = call
    output_dir, before = tmp_path / "console", scene_state(scene)
    logic = module.SegmentMBTFELogic()
    if isinstance(case.outcome, catalogue.Refused):
        with pytest.raises(SegmentError) as raised:
            logic.segmentFiles([images], model, output_dir, tta=False)
        line = "error: " + str(raised.value)
        assert "\n" not in str(raised.value) and case.outcome.matches(line), \
            f"\n  got:      {line}\n  expected: {case.outcome.line}"
        assert not output_dir.exists() or not any(output_dir.iterdir())
    else:
        written = logic.segmentFiles([images], model, output_dir, tta=False)
        assert len(written) == 1 and Path(written[0]).is_file() and written[0].endswith(".seg.nrrd")
    assert scene_state(scene) == before
