"""Which knobs a resumed run (``--c``) must share with its checkpoint, read from the knobs' declarations.

A knob that changes what training computes is declared ``ClassVar[Checked[T]]``; the trainer stores those
values in every checkpoint and refuses to resume with other ones. A new checked knob is one annotation,
not an entry in a second list."""

from __future__ import annotations

import ast
import inspect
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin

__all__ = ["Checked", "checked_knobs"]

_T = TypeVar("_T")
RESUME_CHECKED = "checked on resume"
Checked = Annotated[_T, RESUME_CHECKED]  # ClassVar[Checked[float]]: a knob whose value a resumed run must keep


def _subscripted_name(node: ast.expr) -> tuple[str, ast.expr] | None:
    """``X[...]`` or ``module.X[...]`` -> ("X", the subscript's argument); else None."""
    if not isinstance(node, ast.Subscript):
        return None
    target = node.value
    name = target.id if isinstance(target, ast.Name) else target.attr if isinstance(target, ast.Attribute) else None
    return (name, node.slice) if name else None


def _declares_checked(hint: Any) -> bool:
    """Whether one annotation is ``ClassVar[Checked[...]]`` (or ``Checked[...]``).

    A postponed annotation (a string, ``from __future__ import annotations``) is read by its names, not
    evaluated: nnU-Net imports trainers from ``nnUNet_extTrainer`` folders and drops their modules from
    ``sys.modules`` afterwards, so their globals are gone, and a subclass may name types it imports only
    for type checkers."""
    if isinstance(hint, str):
        try:
            node: ast.expr | None = ast.parse(hint, mode="eval").body
        except SyntaxError:
            return False
        outer = _subscripted_name(node)
        if outer and outer[0] == "ClassVar":
            node = outer[1]
        inner = _subscripted_name(node)
        return bool(inner) and inner[0] == "Checked"
    if get_origin(hint) is ClassVar:
        hint = get_args(hint)[0]
    return get_origin(hint) is Annotated and RESUME_CHECKED in hint.__metadata__


def checked_knobs(cls: type) -> tuple[str, ...]:
    """Names of the class attributes of ``cls`` (and its bases) declared ``ClassVar[Checked[...]]``, sorted.

    The most derived declaration of a name decides, as in ``typing.get_type_hints``."""
    checked: dict[str, bool] = {}
    for klass in reversed(cls.__mro__):
        for name, hint in inspect.get_annotations(klass).items():
            checked[name] = _declares_checked(hint)
    return tuple(sorted(name for name, is_checked in checked.items() if is_checked))
