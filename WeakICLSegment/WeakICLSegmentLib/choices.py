"""The module's choice parameters, with the text the GUI shows for each (saved in the parameter node)."""

import enum


class _LabelledChoice(enum.Enum):
    """A choice whose members carry their GUI text: the parameter node's combo-box connector calls label()."""

    def __new__(cls, value: str, text: str):
        member = object.__new__(cls)
        member._value_ = value
        member.text = text
        return member

    def label(self) -> str:
        return self.text


class Device(_LabelledChoice):
    AUTO = ("auto", "Automatic (GPU when there is one)")
    CUDA = ("cuda", "CUDA GPU")
    CPU = ("cpu", "CPU")


class BatchSource(_LabelledChoice):
    SCENE = ("scene", "Every other volume in the scene")
    FOLDER = ("folder", "Image files in a folder")
    DICOM = ("dicom", "A DICOM study")
