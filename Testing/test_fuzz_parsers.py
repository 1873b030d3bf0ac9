"""Fuzzing the parsers of what users hand us: plans.json, dataset.json, postprocessing.json, version.json (and
the version list), and .seg.nrrd headers.

Property-based (hypothesis): random JSON, random bytes, and valid documents mutated a few steps at a time
(a value replaced by any JSON value, a key removed, a number made zero, negative, huge or NaN, a value
wrapped in a list). Whatever the input, the engine either accepts it or raises one of its own errors
(`SegmentError`, whose text is a sentence for the user), never anything else; each example finishes within
the deadline (no hang, no allocation of absurd sizes); and nothing is written anywhere.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import model_factory
from hostile_files import smooth_volume
from SegmentMBTFELib import cli, load_model
from SegmentMBTFELib.errors import SegmentError
from SegmentMBTFELib.inference.postprocessing import apply_postprocessing
from SegmentMBTFELib.io.segfile import Segment, read_seg_nrrd, write_seg_nrrd
from SegmentMBTFELib.models.postprocessing_recipe import postprocessing_steps
from SegmentMBTFELib.models.versions import VERSION_FILE, ModelVersions, resolve
from SegmentMBTFELib.volume import Volume

pytestmark = pytest.mark.timeout(600)
FUZZ = settings(max_examples=120, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------ strategies

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.sampled_from([0, -1, 1, 10 ** 9]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _places(node, parent=None, key=None):
    """(container, key) of every value inside a JSON document, the document itself first as (None, None)."""
    yield parent, key
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in list(items):
        yield from _places(v, node, k)


@st.composite
def mutated(draw, document):
    """`document` changed in one to four places, as hand edits and broken tools change files."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 4))):
        places = [p for p in _places(document) if p[0] is not None]
        if not places:
            break
        parent, key = draw(st.sampled_from(places))
        action = draw(st.sampled_from(["replace", "remove", "number", "wrap", "empty"]))
        value = parent[key]
        if action == "remove" and isinstance(parent, dict):
            del parent[key]
        elif action == "number":
            parent[key] = draw(st.sampled_from([0, -1, -3.5, 10 ** 7, 10 ** 12, math.nan, math.inf, 0.0001]))
        elif action == "wrap":
            parent[key] = [value]
        elif action == "empty":
            parent[key] = type(value)() if isinstance(value, (list, dict, str)) else None
        else:
            parent[key] = draw(json_values)
    return document


def document_text(valid: dict):
    """What a fuzzed JSON file holds: mostly a mutated valid document (it gets past the first checks), else
    any JSON, or any bytes."""
    edited = mutated(valid).map(lambda d: json.dumps(d).encode())
    return st.one_of(edited, edited, json_values.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200))


# --------------------------------------------------------------------------------------------- helpers

def tree(*folders: Path) -> dict:
    """Every file and folder below `folders` with its size and modification time."""
    return {str(p): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for folder in folders for p in sorted([folder, *folder.rglob("*")])}


def only_own_errors(call):
    """Run `call`; a SegmentError (one sentence for the user) is a fine answer, anything else fails."""
    try:
        call()
    except SegmentError as error:
        assert str(error) and "\n" not in str(error).strip(), repr(str(error))


def describe_model(folder: Path):
    """What `models info` shows, then loading the weights: the command must answer, never crash."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["models", "info", str(folder)])
    assert code in (0, cli.EXIT_ERROR) and "unexpected failure" not in err.getvalue(), err.getvalue()
    only_own_errors(lambda: load_model(folder))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return model_factory.make_model_folder(tmp_path_factory.mktemp("fuzz_model"))


def fuzz_model_file(model: Path, name: str, tmp: Path):
    """A copy of `model` and a function writing `name` in it then describing the model (writes checked)."""
    copy_ = tmp / "model" / model.name
    if copy_.exists():
        shutil.rmtree(copy_)
    shutil.copytree(model, copy_)

    def attempt(content: bytes):
        (copy_ / name).write_bytes(content)
        before = tree(tmp)
        describe_model(copy_)
        assert tree(tmp) == before, "reading a model folder wrote files"
    return attempt


# ----------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("name", ["plans.json", "dataset.json"])
def test_fuzz_plans_and_dataset_json(name, model, tmp_path_factory):
    attempt = fuzz_model_file(model, name, tmp_path_factory.mktemp("fuzz_" + name.split(".")[0]))
    valid = json.loads((model / name).read_text())

    @FUZZ
    @given(document_text(valid))
    def check(content):
        attempt(content)
    check()


VALID_POSTPROCESSING = {"postprocessing_fns": ["remove_all_but_largest_component_from_segmentation"] * 2,
                        "postprocessing_kwargs": [{"labels_or_regions": [1, 2]}, {"labels_or_regions": 2}]}


def test_fuzz_postprocessing_json(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_postprocessing")
    attempt = fuzz_model_file(model, "crossval_results_folds_0/postprocessing.json", tmp)
    (tmp / "model" / model.name / "crossval_results_folds_0").mkdir()
    labels = np.zeros((8, 8, 8), np.uint8)
    labels[1:3, 1:3, 1:3], labels[5:7, 5:7, 5:7], labels[0, 7, 0] = 1, 2, 2

    @FUZZ
    @given(document_text(VALID_POSTPROCESSING))
    def check(content):
        attempt(content)
        try:
            recipe = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            return
        only_own_errors(lambda: (postprocessing_steps(recipe), apply_postprocessing(labels, recipe)))
    check()


@pytest.fixture(scope="module")
def versioned(tmp_path_factory):
    """A model with one version, in a versions home of its own; keys.json (a cache) primed."""
    root = tmp_path_factory.mktemp("fuzz_versions")
    home = root / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGMENTMBTFE_HOME", str(home))
        original = model_factory.make_model_folder(root / "models")
        version = model_factory.perturbed_version(original, 0.01)
        resolve(original)
    return home, original, version.path


def _read_versions(home: Path, original: Path, version: Path):
    """Everything that reads version files: opening the version folder, listing, choosing what to load."""
    only_own_errors(lambda: ModelVersions(version, home=home).list())
    only_own_errors(lambda: resolve(version, home=home))
    only_own_errors(lambda: [v.summary() for v in ModelVersions(original, home=home).list()])
    only_own_errors(lambda: resolve(original, home=home))
    only_own_errors(lambda: resolve(original, "v1", home=home))


@pytest.mark.parametrize("which", ["version.json", "versions.json"])
def test_fuzz_version_json_and_the_version_list(which, versioned):
    home, original, version = versioned
    path = version / VERSION_FILE if which == VERSION_FILE else version.parent / "versions.json"
    valid = json.loads(path.read_text())

    @FUZZ
    @given(document_text(valid))
    def check(content):
        path.write_bytes(content)
        before = tree(home, original.parent.parent)
        _read_versions(home, original, version)
        assert tree(home, original.parent.parent) == before, "reading versions wrote files"
    try:
        check()
    finally:
        path.write_text(json.dumps(valid))


# ------------------------------------------------------------------------------------ .seg.nrrd headers

header_values = st.one_of(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n"),
                                  max_size=30),
                          st.sampled_from(["", "0", "-1", "nan", "1e400", "0 0", "1 2 3 4", "300", "99999999999"]))


@st.composite
def mutated_header(draw, lines):
    """The header lines of a valid .seg.nrrd with one to four changes: a field's value replaced, a line
    removed or repeated, a new `key:=value` line. The basic NRRD fields (sizes, type, encoding) are
    changed too: the reader must refuse them, not read what the header falsely promises."""
    lines = list(lines)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(1, len(lines) - 1))
        action = draw(st.sampled_from(["value", "value", "remove", "repeat", "add"]))
        if action == "value":
            separator = ":=" if ":=" in lines[index] else ": "
            lines[index] = lines[index].split(separator, 1)[0] + separator + draw(header_values)
        elif action == "remove" and len(lines) > 2:
            del lines[index]
        elif action == "repeat":
            lines.insert(index, lines[index])
        else:
            key = draw(st.sampled_from(["Segment0_Name", "Segment5_LabelValue", "Segment1_Color", "Segment0_Tags",
                                        "SegmentMBTFE_model", "Segmentation_MasterRepresentation"]))
            lines.insert(index, f"{key}:={draw(header_values)}")
    return lines


def test_fuzz_seg_nrrd_headers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_seg_nrrd")
    labels = (smooth_volume((6, 7, 8)) > 200).astype(np.uint8) + (smooth_volume((6, 7, 8), 1) > 220)
    path = write_seg_nrrd(Volume(labels), tmp / "valid.seg.nrrd",
                          [Segment("anterior", 1), Segment("posterior", 2)], {"model": "Tiny"})
    header, data = path.read_bytes().split(b"\n\n", 1)
    lines = header.decode().split("\n")
    target = tmp / "fuzzed.seg.nrrd"

    @FUZZ
    @given(st.one_of(mutated_header(lines).map(lambda h: "\n".join(h).encode() + b"\n\n"
                                               + data), st.binary(max_size=300)))
    def check(content):
        target.write_bytes(content)
        before = tree(tmp)
        only_own_errors(lambda: read_seg_nrrd(target))
        assert tree(tmp) == before, "reading a .seg.nrrd wrote files"
    check()
