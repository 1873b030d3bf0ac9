"""The panel's model list is `segment-mbtfe models list`, and "Add model zip..." adds what `models add` adds: a zip
made by nnU-Net's own export is unpacked into the models home, selected, and segments a real volume; a hostile
zip is refused with one sentence, and the models home is left as it was."""
import logging

import pytest

from slicer_testing import load_volume, scene_state, wait_for_panel

pytestmark = pytest.mark.timeout(300)


def choose_zip(widget, monkeypatch, path):
    """Pick "Add model zip..." in the model selector; the file dialog answers `path`, as PySide's does."""
    import qt
    from SegmentMBTFESlicer.segment_panel import ADD_MODEL_ZIP
    monkeypatch.setattr(qt.QFileDialog, "getOpenFileName",
                        staticmethod(lambda *args, **kwargs: (str(path), "Model zips (*.zip)")))
    combo = widget.ui.modelSelector
    combo.setCurrentIndex(combo.findData(ADD_MODEL_ZIP))


def offered(widget) -> list:
    combo = widget.ui.modelSelector
    return [combo.itemText(i) for i in range(combo.count())]


def test_the_panel_adds_a_zip_made_by_nnunet_and_segments_with_it(widget, scene, hippo3d_zip, hippo_case,
                                                                   monkeypatch):
    from SegmentMBTFELib.models.home import installed, models_home
    volume = load_volume(scene, hippo_case)
    choose_zip(widget, monkeypatch, hippo3d_zip)
    assert widget.ui.modelSelector.currentText() == "Dataset901_Hippocampus (3d_fullres)"
    model = widget.segment.currentModel()
    assert model.path == str(models_home() / "Dataset901_Hippocampus") and model.listed_as == "Dataset901_Hippocampus"
    assert "Labels: anterior, posterior" in widget.ui.modelInfoLabel.text()
    # the same models as `segment-mbtfe models list`, then the two ways to add one
    assert [m.listed_as for m in widget.segment._models] == [m.name for m in installed()]
    assert offered(widget)[-2:] == ["Add model folder...", "Add model zip..."]

    assert widget.segment.channelSelectors()[0].currentNode() is volume
    widget.ui.ttaCheckBox.setChecked(False)
    assert widget.ui.segmentButton.isEnabled(), widget.ui.segmentButton.toolTip()
    widget.ui.segmentButton.click()
    wait_for_panel(widget)
    node = widget.ui.outputSegmentationSelector.currentNode()
    assert widget.ui.statusLabel.text().startswith("Done"), widget.ui.statusLabel.text()
    assert node.GetAttribute("SegmentMBTFE.Model") == "Dataset901_Hippocampus (3d_fullres)"
    names = [node.GetSegmentation().GetNthSegment(i).GetName() for i in range(2)]
    assert names == ["anterior", "posterior"]


def test_the_panel_refuses_a_hostile_zip_in_one_sentence(widget, scene, models, tmp_path, monkeypatch, caplog):
    from hostile_zips import export_layout_zip, plain_member
    from SegmentMBTFELib.models.home import models_home
    hostile = export_layout_zip(models["one"], tmp_path / "model.zip",
                                extra=plain_member("Dataset999_Tiny/../../../../evil.txt"))
    before, selected = scene_state(scene), widget.ui.modelSelector.currentText()
    with caplog.at_level(logging.ERROR):
        choose_zip(widget, monkeypatch, hostile)
    shown = [r.getMessage() for r in caplog.records if "model.zip" in r.getMessage()]
    assert shown == ["Refusing model.zip: the member 'Dataset999_Tiny/../../../../evil.txt' climbs out of its folder "
                     "(..), which would be written outside the models folder."]
    assert widget.ui.modelSelector.currentText() == selected  # back to the model chosen before
    assert not models_home().exists() and not list(tmp_path.parent.rglob("evil.txt"))
    assert scene_state(scene) == before
    assert not any(text.startswith("Dataset999_Tiny") for text in offered(widget))
