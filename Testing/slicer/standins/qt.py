"""Stand-in for Slicer's PythonQt `qt` module: PySide6's classes under the one `qt` namespace.

Inside Slicer, `import qt` gives PythonQt's wrapping of QtCore, QtGui, QtWidgets and QtUiTools in one
module. Here the same names come from PySide6 (offscreen). Deliberately NOT emulated: PythonQt's
property-style access (`w.enabled = False`) and string connects (`w.connect("clicked()", f)`); module code
must not use them, and these tests fail if it does. Emulated, because Slicer's own `slicer.util` relies
on it: `QObject.name` (PythonQt's spelling of objectName, read by `slicer.util.childWidgetVariables`),
and a `QUiLoader` that knows Slicer's custom widgets (ctk, qMRML), as Slicer's loader does.
"""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import *  # noqa: E402,F401,F403
from PySide6.QtGui import *  # noqa: E402,F401,F403
from PySide6.QtWidgets import *  # noqa: E402,F401,F403
from PySide6.QtUiTools import QUiLoader as _PySideUiLoader  # noqa: E402

QObject.name = property(lambda self: self.objectName())  # noqa: F405

CUSTOM_WIDGETS = []  # filled by the ctk and qMRML stand-ins


class QUiLoader(_PySideUiLoader):
    def __init__(self, parent=None):
        super().__init__(parent)
        for widget_class in CUSTOM_WIDGETS:
            self.registerCustomWidget(widget_class)
