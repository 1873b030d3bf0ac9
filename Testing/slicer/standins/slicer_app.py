"""Stand-ins for the parts of Slicer that exist only inside the Slicer application.

`slicer-core` (PyPI) is the real Slicer core: MRML scene and nodes, storage nodes, the segmentations
logic, and Slicer's own `slicer.util`. What it lacks is the application around them. `install()` adds
small, honest versions of exactly those pieces to the real `slicer` namespace:

- `slicer.app` (testing mode, settings, cursor, processEvents) and `slicer.mrmlScene` (a real scene);
- the segmentation converter rules the Segmentations module registers at startup (closed surfaces);
- `slicer.qMRMLWidget`, `slicer.qMRMLNodeComboBox` (Qt widgets listing real scene nodes);
- `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper`, `slicer.i18n` (Slicer's pure-Python
  base classes, reduced to the behaviour the module uses);
- `slicer.modules.<name>.path`, which `ScriptedLoadableModuleWidget.resourcePath` reads.
"""
import logging
import sys
import types
import typing
import unittest

import qt

import slicer

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ application

class Application:
    """`slicer.app` in testing mode: message boxes are logged, confirmations answer yes (as in Slicer's
    own test runs); QSettings go to the file the tests choose."""
    applicationName = "Slicer"

    def __init__(self, settings_path: str):
        self.qt_app = qt.QApplication.instance() or qt.QApplication([])
        self._settings = qt.QSettings(settings_path, qt.QSettings.IniFormat)
        self.temporaryPath = qt.QDir.tempPath()

    def testingEnabled(self):
        return True

    def settings(self):
        return self._settings

    def userSettings(self):
        return self._settings

    def processEvents(self):
        self.qt_app.processEvents()

    def setOverrideCursor(self, cursor):
        self.qt_app.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        self.qt_app.restoreOverrideCursor()

    def layoutManager(self):
        return None  # no views here; modules must cope (Slicer without a main window has none either)


def install(settings_path: str, module_paths: dict = None):
    """Make `slicer` look like the application's: returns the fresh scene."""
    application = Application(settings_path)
    slicer.app = application
    slicer.mrmlScene = new_scene()
    slicer.qMRMLWidget = qMRMLWidget
    slicer.qMRMLNodeComboBox = qMRMLNodeComboBox
    slicer.modules = types.SimpleNamespace(**{name.lower(): types.SimpleNamespace(path=path)
                                              for name, path in (module_paths or {}).items()})
    # Core module logics some slicer.util functions call (e.g. updateSegmentBinaryLabelmapFromArray).
    slicer.modules.volumes = _CoreModule(slicer.vtkSlicerVolumesLogic)
    slicer.modules.segmentations = _CoreModule(slicer.vtkSlicerSegmentationsModuleLogic)
    qt.QSettings.setDefaultFormat(qt.QSettings.IniFormat)
    _register_submodule("ScriptedLoadableModule", _scripted_loadable_module())
    _register_submodule("parameterNodeWrapper", _parameter_node_wrapper())
    _register_submodule("i18n", _i18n())
    _register_converter_rules()
    return slicer.mrmlScene


class _CoreModule:
    """`slicer.modules.<name>`: its logic() is the real logic class, working on the current scene."""

    def __init__(self, logic_class):
        self._logic_class, self._logic = logic_class, None

    def logic(self):
        if self._logic is None or self._logic.GetMRMLScene() is not slicer.mrmlScene:
            self._logic = self._logic_class()
            self._logic.SetMRMLApplicationLogic(slicer.mrmlScene._application_logic)
            self._logic.SetMRMLScene(slicer.mrmlScene)
        return self._logic


def new_scene():
    """A real MRML scene with an application logic, as the application creates it."""
    scene = slicer.vtkMRMLScene()
    application_logic = slicer.vtkMRMLApplicationLogic()
    application_logic.SetMRMLScene(scene)
    scene._application_logic = application_logic  # keep it alive with the scene
    return scene


def _register_submodule(name, module):
    module.__name__ = f"slicer.{name}"
    sys.modules[module.__name__] = module
    setattr(slicer, name, module)


def _register_converter_rules():
    """What qSlicerSegmentationsModule::setup does: labelmap <-> closed surface conversions."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())


# ------------------------------------------------------------------------------------------ qMRML widgets

class qMRMLWidget(qt.QWidget):
    """A widget that holds a scene reference (and tells its children, as `mrmlSceneChanged` does)."""
    mrmlSceneChanged = qt.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None

    def setMRMLScene(self, scene):
        self._scene = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self._scene


class qMRMLNodeComboBox(qt.QComboBox):
    """The node selector: lists the scene's nodes of `nodeTypes` and follows nodes being added and removed.

    Like the real one: with `noneEnabled` an empty first entry (`noneDisplay`); without it the first
    matching node is selected as soon as there is one; `currentNodeChanged` carries the node (or None).
    """
    currentNodeChanged = qt.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene, self._observations = None, []
        self._node_types, self._none_enabled, self._none_display = [], False, "None"
        self._flags = {"addEnabled": False, "removeEnabled": False, "renameEnabled": False, "editEnabled": False,
                       "showHidden": False, "showChildNodeTypes": True, "selectNodeUponCreation": True}
        self._current_id = None
        self.currentIndexChanged.connect(self._index_changed)

    # -- properties, settable from Designer, setProperty() and the setters. As in PythonQt, a property hides
    # its same-named getter (`nodeTypes` is the property; read it with property("nodeTypes")).
    def _get_node_types(self):
        return list(self._node_types)

    def setNodeTypes(self, types_):
        self._node_types = [str(t) for t in types_]
        self._refresh()

    def setNoneEnabled(self, enabled):
        self._none_enabled = bool(enabled)
        self._refresh()

    def setNoneDisplay(self, text):
        self._none_display = str(text)
        self._refresh()

    def _flag(name):  # noqa: N805 - builds the plain boolean properties
        return qt.Property(bool, lambda self: self._flags[name], lambda self, v: self._flags.__setitem__(name, bool(v)))

    nodeTypes = qt.Property("QStringList", _get_node_types, setNodeTypes)
    noneEnabled = qt.Property(bool, lambda self: self._none_enabled, setNoneEnabled)
    noneDisplay = qt.Property(str, lambda self: self._none_display, setNoneDisplay)
    addEnabled, removeEnabled, renameEnabled = _flag("addEnabled"), _flag("removeEnabled"), _flag("renameEnabled")
    editEnabled, showHidden = _flag("editEnabled"), _flag("showHidden")
    showChildNodeTypes, selectNodeUponCreation = _flag("showChildNodeTypes"), _flag("selectNodeUponCreation")

    def setAddEnabled(self, v): self._flags["addEnabled"] = bool(v)  # noqa: E704
    def setRemoveEnabled(self, v): self._flags["removeEnabled"] = bool(v)  # noqa: E704
    def setRenameEnabled(self, v): self._flags["renameEnabled"] = bool(v)  # noqa: E704
    def setShowHidden(self, v): self._flags["showHidden"] = bool(v)  # noqa: E704
    def setShowChildNodeTypes(self, v): self._flags["showChildNodeTypes"] = bool(v)  # noqa: E704
    def setSelectNodeUponCreation(self, v): self._flags["selectNodeUponCreation"] = bool(v)  # noqa: E704

    # -- scene ---------------------------------------------------------------------------------------------
    def setMRMLScene(self, scene):
        for observed, tag in self._observations:
            observed.RemoveObserver(tag)
        self._scene, self._observations = scene, []
        if scene is not None:
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
                self._observations.append((scene, scene.AddObserver(event, lambda *a: self._refresh())))
        self._refresh()

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        return self._scene.GetNodeByID(self._current_id) if (self._scene and self._current_id) else None

    def currentNodeID(self):
        return self._current_id or ""

    def setCurrentNode(self, node):
        self.setCurrentNodeID(node.GetID() if node is not None else "")

    def setCurrentNodeID(self, node_id):
        index = self.findData(node_id) if node_id else (0 if self._none_enabled else -1)
        self.setCurrentIndex(index)
        self._index_changed(self.currentIndex())

    def nodes(self):
        return [self._scene.GetNodeByID(self.itemData(i)) for i in range(self.count()) if self.itemData(i)]

    # -- internals -------------------------------------------------------------------------------------------
    def _matching_nodes(self):
        if self._scene is None:
            return []
        found = []
        for index in range(self._scene.GetNumberOfNodes()):
            node = self._scene.GetNthNode(index)
            if any(node.IsA(t) for t in self._node_types) and (self._flags["showHidden"]
                                                                or not node.GetHideFromEditors()):
                if self._flags["showChildNodeTypes"] or node.GetClassName() in self._node_types:
                    found.append(node)
        return found

    def _refresh(self):
        previous = self._current_id
        self.blockSignals(True)
        self.clear()
        if self._none_enabled:
            self.addItem(self._none_display, "")
        for node in self._matching_nodes():
            self.addItem(node.GetName(), node.GetID())
        index = self.findData(previous) if previous else -1
        if index < 0:
            index = 0 if self.count() else -1
        self.setCurrentIndex(index)
        self.blockSignals(False)
        self._index_changed(self.currentIndex())

    def _index_changed(self, index):
        node_id = self.itemData(index) if index >= 0 else None
        node_id = node_id or None
        if node_id != self._current_id:
            self._current_id = node_id
            self.currentNodeChanged.emit(self.currentNode())


qt.CUSTOM_WIDGETS.extend([qMRMLWidget, qMRMLNodeComboBox])


# ------------------------------------------------------------------------------- ScriptedLoadableModule

def _scripted_loadable_module():
    """Slicer's Base/Python/slicer/ScriptedLoadableModule.py, minus the developer (reload/edit) section."""
    import os
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title, parent.categories, parent.dependencies, parent.contributors = "", [], [], []
            parent.helpText, parent.acknowledgementText = "", ""

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

        def getDefaultModuleDocumentationLink(self, docPage=None):
            return ""

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Widget")]
            if parent is None:
                parent = slicer.qMRMLWidget()
                parent.setLayout(qt.QVBoxLayout())
                parent.setMRMLScene(slicer.mrmlScene)
            self.parent = parent
            self.layout = parent.layout()

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def setup(self):
            pass

        def cleanup(self):
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[:-len("Logic")]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node:
                return node
            return slicer.mrmlScene.AddNode(self.createParameterNode())

        def createParameterNode(self):
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.messageDelay = 0

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            log.info(message)
            slicer.app.processEvents()

        def takeScreenshot(self, name, description, type=-1):
            pass

        def runTest(self):  # unittest needs a test method; subclasses override
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    module.__all__ = [c for c in vars(module) if c.startswith("Scripted")]
    return module


# ----------------------------------------------------------------------------------- parameterNodeWrapper

def _parameter_node_wrapper():
    """`@parameterNodeWrapper`: typed attributes stored in a vtkMRMLScriptedModuleNode, as Slicer's does
    for the types the module uses (bool, int, float, str, MRML nodes, lists of MRML nodes) with defaults
    and the WithinRange / Choice validators. GUI binding (connectGui) is not provided: the module syncs
    its widgets itself."""
    module = types.ModuleType("slicer.parameterNodeWrapper")

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

        def validate(self, value):
            if not self.minimum <= value <= self.maximum:
                raise ValueError(f"value {value} is not within [{self.minimum}, {self.maximum}]")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

        def validate(self, value):
            if value not in self.choices:
                raise ValueError(f"value {value!r} is not one of {self.choices}")

    def parameterNodeWrapper(cls):
        hints = typing.get_type_hints(cls, include_extras=True)
        defaults = {name: getattr(cls, name) for name in hints if hasattr(cls, name)}
        for name, hint in hints.items():
            setattr(cls, name, _field(name, hint))

        def __init__(self, parameterNode):
            self.parameterNode = parameterNode
            for name, hint in hints.items():
                if not _is_node_type(_base(hint)) and not parameterNode.GetParameter(name):
                    setattr(self, name, defaults.get(name, _base(hint)()))
        cls.__init__ = __init__
        return cls

    def _field(name, hint):
        base, validators = _base(hint), [v for v in getattr(hint, "__metadata__", ()) if hasattr(v, "validate")]

        def get(self):
            node = self.parameterNode
            if typing.get_origin(base) is list:
                return [node.GetNthNodeReference(name, i) for i in range(node.GetNumberOfNodeReferences(name))]
            if _is_node_type(base):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            return (text == "True") if base is bool else base(text)

        def set_(self, value):
            node = self.parameterNode
            for validator in validators:
                validator.validate(value)
            if typing.get_origin(base) is list:
                node.RemoveNodeReferenceIDs(name)
                for item in value:
                    node.AddNodeReferenceID(name, item.GetID() if item is not None else "")
            elif _is_node_type(base):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, str(base(value)))
        return property(get, set_)

    def _base(hint):
        return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint

    def _is_node_type(base):
        return isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode) or typing.get_origin(base) is list

    module.parameterNodeWrapper, module.WithinRange, module.Choice = parameterNodeWrapper, WithinRange, Choice
    module.__all__ = ["parameterNodeWrapper", "WithinRange", "Choice"]
    return module


def _i18n():
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module
