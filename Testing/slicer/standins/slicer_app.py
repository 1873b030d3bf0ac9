"""Stand-ins for the parts of Slicer that exist only inside the Slicer application.

`slicer-core` (PyPI) is the real Slicer core: MRML scene and nodes, storage nodes, the segmentations
logic, and Slicer's own `slicer.util`. What it lacks is the application around them. `install()` adds
small, honest versions of exactly those pieces to the real `slicer` namespace:

- `slicer.app` (testing mode, settings, cursor, processEvents, module manager) and `slicer.mrmlScene`;
- Slicer's event loop as it treats Python: PythonQt runs without thread support, so the main thread holds
  the GIL while Qt idles and Python threads advance only when Qt calls into Python. `processEvents()` and
  `run_event_loop()` call Qt's C++ event processing through `ctypes.PyDLL`, which keeps the GIL, exactly
  like that (PySide6's own exec()/processEvents() release the GIL and would hide slow threads);
- the segmentation converter rules the Segmentations module registers at startup (closed surfaces);
- `slicer.qMRMLWidget`, `slicer.qMRMLNodeComboBox` (Qt widgets listing real scene nodes), and the module
  panel's qSlicerScriptedLoadableModuleWidget (instantiates the Python widget, reload());
- `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper`, `slicer.i18n` (Slicer's pure-Python
  base classes, reduced to the behaviour the module uses);
- `slicer.modules.<name>.path`, which `ScriptedLoadableModuleWidget.resourcePath` reads;
- `slicer.util.pip_install` / `pip_uninstall` as Slicer 5.6-5.10 have them (blocking, on the main thread);
- `PythonSlicer`, the launcher the module starts its worker with (python_slicer.py), found on PATH.
"""
import ctypes
import logging
import os
import sys
import time
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
        self._module_manager = ModuleManager()

    def testingEnabled(self):
        return True

    def settings(self):
        return self._settings

    def userSettings(self):
        return self._settings

    def processEvents(self):
        _QT_HOLDING_THE_GIL.process_events()

    def moduleManager(self):
        return self._module_manager

    def setOverrideCursor(self, cursor):
        self.qt_app.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        self.qt_app.restoreOverrideCursor()

    def layoutManager(self):
        return None  # no views here; modules must cope (Slicer without a main window has none either)


class ModuleManager:
    """`slicer.app.moduleManager()`: PythonQt-style string connects to moduleAboutToBeUnloaded(QString), which
    Slicer emits for every module when it exits (tests call unload(name))."""

    def __init__(self):
        self._slots = []

    def connect(self, signal, slot):
        self._slots.append((signal, slot))

    def disconnect(self, signal, slot):
        self._slots = [(s, f) for s, f in self._slots if (s, f) != (signal, slot)]

    def unload(self, module_name: str):
        for signal, slot in list(self._slots):
            if signal == "moduleAboutToBeUnloaded(QString)":
                slot(module_name)


class _QtHoldingTheGil:
    """Qt's C++ event processing called through ctypes.PyDLL, which does not release the GIL: what Slicer's
    main thread does while Qt idles. Linux symbol names of the Qt 6 that PySide6 ships."""
    PROCESS_EVENTS = "_ZN16QCoreApplication13processEventsE6QFlagsIN10QEventLoop17ProcessEventsFlagEE"
    LOOP_EXEC = "_ZN10QEventLoop4execE6QFlagsINS_17ProcessEventsFlagEE"

    def __init__(self):
        import PySide6
        core = ctypes.PyDLL(os.path.join(os.path.dirname(PySide6.__file__), "Qt", "lib", "libQt6Core.so.6"))
        self._process_events = core[self.PROCESS_EVENTS]
        self._process_events.argtypes, self._process_events.restype = [ctypes.c_int], None
        self._exec = core[self.LOOP_EXEC]
        self._exec.argtypes, self._exec.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_int

    def process_events(self):
        self._process_events(0)

    def run(self, loop):
        import shiboken6
        return self._exec(shiboken6.getCppPointer(loop)[0], 0)


_QT_HOLDING_THE_GIL = _QtHoldingTheGil()


def run_event_loop(until=None, timeout: float = 60.0, check_ms: int = 100) -> bool:
    """Run Qt's event loop as Slicer does (the GIL held while idle) until `until()` is true or `timeout`
    seconds pass; returns until()'s last value. Python runs only in Qt's callbacks, `until` among them."""
    loop = qt.QEventLoop()
    deadline = time.perf_counter() + timeout
    done = [bool(until and until())]

    def check():
        done[0] = bool(until and until())
        if done[0] or time.perf_counter() >= deadline:
            loop.quit()
    timer = qt.QTimer()
    timer.setInterval(check_ms)
    timer.timeout.connect(check)
    if not done[0]:
        timer.start()
        _QT_HOLDING_THE_GIL.run(loop)
        timer.stop()
    return done[0]


def install(settings_path: str, module_paths: dict = None):
    """Make `slicer` look like the application's: returns the fresh scene."""
    application = Application(settings_path)
    slicer.app = application
    slicer.mrmlScene = new_scene()
    slicer.qMRMLWidget = qMRMLWidget
    slicer.qMRMLNodeComboBox = qMRMLNodeComboBox
    slicer.modules = types.SimpleNamespace(**{name.lower(): ScriptedModule(name, path)
                                              for name, path in (module_paths or {}).items()})
    # Core module logics some slicer.util functions call (e.g. updateSegmentBinaryLabelmapFromArray).
    slicer.modules.volumes = _CoreModule(slicer.vtkSlicerVolumesLogic)
    slicer.modules.segmentations = _CoreModule(slicer.vtkSlicerSegmentationsModuleLogic)
    slicer.modules.terminologies = _CoreModule(slicer.vtkSlicerTerminologiesModuleLogic)
    slicer.modules.colors = _CoreModule(slicer.vtkSlicerColorLogic)
    qt.QSettings.setDefaultFormat(qt.QSettings.IniFormat)
    _register_submodule("ScriptedLoadableModule", _scripted_loadable_module())
    _register_submodule("parameterNodeWrapper", _parameter_node_wrapper())
    _register_submodule("i18n", _i18n())
    _register_converter_rules()
    slicer.util.pip_install, slicer.util.pip_uninstall = _pip("install"), _pip("uninstall")
    install_launcher(os.path.join(os.path.dirname(os.path.abspath(settings_path)), "bin"))
    return slicer.mrmlScene


def _pip(command: str):
    """slicer.util.pip_install / pip_uninstall as Slicer 5.6-5.10 have them (slicer-core's hand over to a
    slicer.packaging it lacks): `PythonSlicer -m pip COMMAND ...`, its output read line by line on the main
    thread until pip ends (slicer.util.logProcessOutput)."""
    def run(requirements):
        import shlex
        args = shlex.split(requirements) if isinstance(requirements, str) else list(requirements)
        slicer.util.executePythonModule("pip", [command, *args] + (["--yes"] if command == "uninstall" else []))
    return run


def install_launcher(folder: str) -> str:
    """A `PythonSlicer` in `folder`, put first on PATH, where the module's worker_python() finds it (inside
    Slicer it is found next to sys.executable): every worker the tests start runs behind it, as in Slicer.
    A shell script that execs python_slicer.py: the launcher keeps the pid the module's QProcess knows."""
    import shlex
    os.makedirs(folder, exist_ok=True)
    launcher = os.path.join(folder, "PythonSlicer")
    with open(launcher, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                f"{shlex.quote(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'python_slicer.py'))} \"$@\"\n")
    os.chmod(launcher, 0o755)
    os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
    return launcher


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
        # As the real one's destructor: stop observing the scene once the widget is gone.
        observations = self._observations
        self.destroyed.connect(lambda *args: [observed.RemoveObserver(tag) for observed, tag in observations])

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
        self._scene = scene
        del self._observations[:]  # the same list the destroyed() handler empties
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


class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """A scripted module's panel (Base/QTGUI/qSlicerScriptedLoadableModuleWidget.cxx): instantiates the module's
    Python <Name>Widget with itself as parent, records it as slicer.modules.<Name>Widget; reload() does that
    again from the (re-imported) module and calls setup()."""

    def __init__(self, module_name: str, path: str):
        super().__init__()
        self.setLayout(qt.QVBoxLayout())
        self.setMRMLScene(slicer.mrmlScene)
        self.isEntered = True  # the module is shown
        self._module_name, self._path, self._self = module_name, path, None

    def pythonSource(self):
        return self._path

    def setPythonSource(self, path):
        import importlib.util
        module = sys.modules.get(self._module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(self._module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[self._module_name] = module
            spec.loader.exec_module(module)
        self._self = getattr(module, self._module_name + "Widget")(self)
        setattr(slicer.modules, self._module_name + "Widget", self._self)

    def setup(self):
        self._self.setup()

    def reload(self):
        self.setPythonSource(self._path)
        self.setup()

    def self(self):
        return self._self


class ScriptedModule:
    """`slicer.modules.<name>`: its path, and its panel, made on first use as Slicer makes it."""

    def __init__(self, name: str, path: str):
        self.name, self.path, self._panel = name, path, None

    def widgetRepresentation(self):
        if self._panel is None:
            self.newPanel()
        return self._panel

    def newPanel(self):
        """A new panel (what a fresh Slicer shows): the module's Python widget set up in it."""
        self._panel = qSlicerScriptedLoadableModuleWidget(self.name, self.path)
        self._panel.setPythonSource(self.path)
        self._panel.setup()
        return self._panel

    def closePanel(self):
        """Close and delete the panel (the next widgetRepresentation() makes a new one)."""
        if self._panel is not None:
            self._panel.close()
            self._panel.deleteLater()
            self._panel = None


# ------------------------------------------------------------------------------- ScriptedLoadableModule

def _scripted_loadable_module():
    """Slicer's Base/Python/slicer/ScriptedLoadableModule.py, minus the developer section's buttons."""
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
            # As Slicer's: without a parent it makes one AND calls setup() itself, before a subclass's
            # __init__ continues; it registers cleanup() for when Slicer unloads the module (at exit).
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Widget"):
                self.moduleName = self.moduleName[:-6]
            self.developerMode = False
            if not parent:
                self.parent = slicer.qMRMLWidget()
                self.parent.setLayout(qt.QVBoxLayout())
                self.parent.setMRMLScene(slicer.mrmlScene)
            else:
                self.parent = parent
            self.layout = self.parent.layout()
            if not parent:
                self.setup()
                self.parent.show()
            slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

        def resourcePath(self, filename):
            return os.path.join(os.path.dirname(slicer.util.modulePath(self.moduleName)), "Resources", filename)

        def cleanup(self):
            pass

        def _onModuleAboutToBeUnloaded(self, moduleName):
            if moduleName == self.moduleName:
                self.cleanup()
                slicer.app.moduleManager().disconnect("moduleAboutToBeUnloaded(QString)",
                                                      self._onModuleAboutToBeUnloaded)

        def setup(self):
            pass  # the developer section (Reload, Test) is not built here

        def onReload(self):
            slicer.util.reloadScriptedModule(self.moduleName)  # Slicer's own function (slicer-core)

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
