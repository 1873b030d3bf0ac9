"""Shared pytest fixtures: the real data in ../shared/data and the nnU-Net v2 reference (nnunet_reference.py).

Reference model folders are built lazily, once per session, under one session directory (all eight kinds
take about 80 s on 2 idle cores; 5-15 s each), or under $SEGMENTMBTFE_REFERENCE_CACHE when set (scripts/test.sh
sets it): then they survive between runs and are rebuilt only when nnunet_reference.py, nnunetv2 or the request
changes, and Testing/build_references.py may build them ahead in another process (one build at a time:
build_lock.py). Predictions by nnU-Net are kept for the session only.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

import known_skips
import nnunet_reference as ref

NNUNET_MISSING = "nnunetv2 is not installed"
# Hippocampus test inputs: the last cases in sorted order, never among the first six that train the models.
HIPPO_TEST_COUNT = 2
# CT test inputs, small enough that nnU-Net predicts each in seconds (ITK x, y, z voxel index and size).
CT_DICOM_CROP = ((200, 220, 0), (128, 128, 20))  # 0.977 x 0.977 x 2 mm: separate-z from the target spacing
CT_SM_CROP = ((30, 20, 5), (32, 32, 16))  # 3 mm isotropic: separate-z from the target spacing as well


# Every skip is checked against known_skips.py by test_known_skips.py, which runs last.
SKIP_CHECK = "test_known_skips.py::test_only_the_known_tests_skip"


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: every test of the files collected is named
def pytest_collection_modifyitems(items):
    known_skips.NAMED.update(item.nodeid for item in items)
    items.sort(key=lambda item: item.nodeid.endswith(SKIP_CHECK))  # stable: the rest keep their order


def pytest_collection_finish(session):
    known_skips.COLLECTED.update(item.nodeid for item in session.items)


def pytest_runtest_logreport(report):
    known_skips.record(report)


def agreement(a, b) -> float:
    """Fraction of equal voxels between two label maps (arrays or image files)."""
    return ref.agreement(a, b)


@pytest.fixture(name="agreement", scope="session")
def agreement_fixture():
    return agreement


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module, as nnU-Net's side of the parity tests runs: on the 2 shared cores of the test
    machine, two OpenMP threads made the engine's predictions ten times slower (7 s instead of 0.5 s for a 2D case;
    14 s instead of 3 s for MBTFE-UNet with TTA)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def versions_home(tmp_path_factory) -> Path:
    """Model versions written by any test go to a session folder, never the user's real versions home."""
    home = tmp_path_factory.mktemp("segmentmbtfe_home")
    previous = os.environ.get("SEGMENTMBTFE_HOME")
    os.environ["SEGMENTMBTFE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("SEGMENTMBTFE_HOME", None)
    else:
        os.environ["SEGMENTMBTFE_HOME"] = previous


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict:
    """Tiny model folders written by model_factory (no nnU-Net): one channel, two channels (T1, T2), and 2d."""
    import model_factory
    root = tmp_path_factory.mktemp("factory_models")
    return {
        "one": model_factory.make_model_folder(root, dataset_name="Dataset999_Tiny"),
        "two": model_factory.make_model_folder(root, channels=("T1", "T2"), dataset_name="Dataset992_Two"),
        "flat": model_factory.make_model_folder(root, configuration="2d", dataset_name="Dataset993_Flat"),
    }


@pytest.fixture(scope="session")
def good_image(tmp_path_factory) -> Path:
    """A small 3D image with structure (22 x 24 x 20 NRRD) that the tiny models segment into several labels."""
    from hostile_files import smooth_volume, write_image
    return write_image(tmp_path_factory.mktemp("inputs") / "case.nrrd", smooth_volume())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real, public test data); tests that need it skip when it is absent."""
    if not (ref.DEFAULT_DATA_DIR / "hippocampus").is_dir():
        pytest.skip(f"real test data not found at {ref.DEFAULT_DATA_DIR} (../shared/data)")
    return ref.DEFAULT_DATA_DIR


@pytest.fixture(scope="session")
def nnunet_installed() -> None:
    # find_spec, not import: importing nnunetv2 here would freeze its nnUNet_* paths for the whole session.
    try:
        found = importlib.util.find_spec("nnunetv2") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        pytest.skip(NNUNET_MISSING)


@pytest.fixture(scope="session")
def nnunet_models_root(tmp_path_factory) -> Path:
    cache = os.environ.get("SEGMENTMBTFE_REFERENCE_CACHE")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        return Path(cache)
    return tmp_path_factory.mktemp("nnunet_models")


@pytest.fixture(scope="session")
def nnunet_model(nnunet_installed, shared_data, nnunet_models_root):
    """nnunet_model(kind, folds=None) -> trained-model folder built by nnunetv2 (see nnunet_reference.KINDS)."""
    def build(kind: str, folds=None) -> Path:
        return ref.make_model_folder(nnunet_models_root, kind=kind, folds=folds, data_dir=shared_data)
    return build


@pytest.fixture(scope="session")
def hippo3d_model(nnunet_model):
    return nnunet_model("hippo3d")


@pytest.fixture(scope="session")
def hippo3d_zip(hippo3d_model, nnunet_models_root) -> Path:
    """hippo3d as nnU-Net's own `nnUNetv2_export_model_to_zip` packs it (nnunet_zip.py; about 20 s the first time)."""
    import nnunet_zip
    return nnunet_zip.export_zip(nnunet_models_root, hippo3d_model)


@pytest.fixture(scope="session")
def hippo2d_model(nnunet_model):
    return nnunet_model("hippo2d")


@pytest.fixture(scope="session")
def hippo3d_2folds_model(nnunet_model):
    return nnunet_model("hippo3d_2folds")


@pytest.fixture(scope="session")
def hippo3d_resenc_model(nnunet_model):
    return nnunet_model("hippo3d_resenc")


@pytest.fixture(scope="session")
def ct_aniso_model(nnunet_model):
    return nnunet_model("ct_aniso")


@pytest.fixture(scope="session")
def hippo3d_regions_model(nnunet_model):
    return nnunet_model("hippo3d_regions")


@pytest.fixture(scope="session")
def hippo3d_oldplans_model(nnunet_model):
    return nnunet_model("hippo3d_oldplans")


@pytest.fixture(scope="session")
def hippo3d_postprocessing_model(nnunet_model):
    return nnunet_model("hippo3d_postprocessing")


@pytest.fixture(scope="session")
def hippo_test_cases(shared_data) -> list[list[Path]]:
    """Two real hippocampus MR cases (1 mm iso, ~35x50x36) that no reference model trained on."""
    images = shared_data / "hippocampus" / "train" / "images"
    return [[images / f"{case_id}.nii.gz"] for case_id in ref.hippocampus_case_ids(shared_data)[-HIPPO_TEST_COUNT:]]


@pytest.fixture(scope="session")
def ct_dicom_dir(shared_data) -> Path:
    """The 512x512x20 CT DICOM series (0.977 x 0.977 x 2.0 mm, some UIDs empty)."""
    return shared_data / "formats" / "totalsegmentator" / "example_ct_dicom"


@pytest.fixture(scope="session")
def ct_test_cases(shared_data, ct_dicom_dir, tmp_path_factory) -> list[list[Path]]:
    """Two real CT crops as NIfTI for ct_aniso: 128x128x20 of the DICOM series and 32x32x16 of
    example_ct_sm (3 mm). nnU-Net resamples both with separate z to the model's 4.8 x 1.2 x 1.2 mm."""
    import SimpleITK as sitk
    folder = tmp_path_factory.mktemp("ct_test_cases")
    dicom_crop = ref.dicom_series_to_file(ct_dicom_dir, folder / "ct_dicom_crop_0000.nii.gz", *CT_DICOM_CROP)
    ct_sm = sitk.ReadImage(str(shared_data / "formats" / "totalsegmentator" / "example_ct_sm.nii.gz"))
    index, size = CT_SM_CROP
    sitk.WriteImage(sitk.RegionOfInterest(ct_sm, size, index), str(folder / "ct_sm_crop_0000.nii.gz"))
    return [[dicom_crop], [folder / "ct_sm_crop_0000.nii.gz"]]


@pytest.fixture(scope="session")
def nnunet_prediction(nnunet_installed, tmp_path_factory):
    """nnunet_prediction(model_dir, cases, **predict_with_nnunet options) -> output files; each distinct
    request runs nnUNetPredictor once per session, so parity tests and self-tests share predictions.
    Defaults: folds=None (nnU-Net auto-detects them) and threads=1. One torch thread because on a busy
    2-core machine two OpenMP threads made a 7 s prediction take 110 s; note that nnU-Net's probabilities
    differ by ~1e-4 between 1 and 2 threads (labels agreed), and are bit-identical at a fixed count."""
    done = {}

    def predict(model_dir, cases, **options) -> list[Path]:
        options.setdefault("folds", None)
        options.setdefault("threads", 1)
        key = json.dumps([str(model_dir), [[str(f) for f in c] for c in cases], options], sort_keys=True,
                         default=str)
        if key not in done:
            output_dir = tmp_path_factory.mktemp("nnunet_prediction")
            done[key] = ref.predict_with_nnunet(model_dir, cases, output_dir, **options)
        return done[key]
    return predict
