"""Stand-in for the CTK widgets the module's .ui uses: ctkCollapsibleButton.

Real ctkCollapsibleButton is a button-shaped header whose children hide when collapsed; here a QGroupBox
with the same `text` and `collapsed` properties, enough to load the .ui and show its sections.
"""
import qt


class ctkCollapsibleButton(qt.QGroupBox):
    def __init__(self, parent=None):
        super().__init__(parent)
        self._collapsed = False

    def _text(self):
        return self.title()

    def _set_text(self, text):
        self.setTitle(text)

    def _is_collapsed(self):
        return self._collapsed

    def setCollapsed(self, collapsed):
        self._collapsed = bool(collapsed)
        for child in self.findChildren(qt.QWidget, options=qt.Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)

    text = qt.Property(str, _text, _set_text)
    collapsed = qt.Property(bool, _is_collapsed, setCollapsed)


qt.CUSTOM_WIDGETS.append(ctkCollapsibleButton)
