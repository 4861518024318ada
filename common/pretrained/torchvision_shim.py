"""Import torchvision's Python layer beside the CPU build of torch.

timm and open_clip import ``torchvision.transforms``. The torchvision on the package
registry that matches torch 2.13.0 (0.28.0) is a CUDA build: its compiled operators
(``torchvision/_C.so``: detection ops such as ``nms``, ``roi_align``) need
``libc10_cuda.so`` and do not load beside the CPU torch. torchvision skips the other
operators' registrations when its library did not load, but registers fake (meta) kernels
for ``torchvision::nms`` and ``torchvision::qnms`` unconditionally, and fails at import
("operator torchvision::nms does not exist").

:func:`import_torchvision` imports it as is; only when its compiled library is missing does
it declare those two operators' schemas (the ones torchvision's own C++ declares, with no
kernel: calling them raises) and import again. The transforms, models and functional
image operations are plain torch and work; the detection operators stay unavailable, and
nothing here uses them.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_declared: list[torch.library.Library] = []  # kept alive: a dropped Library undoes its defs


def import_torchvision() -> ModuleType:
    """``torchvision``, importable beside the CPU torch (module docstring)."""
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms does not exist" not in str(error):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        if not _declared:
            library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                library.define(schema)
            _declared.append(library)
        import torchvision
    return torchvision
