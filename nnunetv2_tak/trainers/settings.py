"""Which knobs a resumed run (``--c``) must share with its checkpoint, read from the knobs' declarations.

A knob that changes what training computes is declared ``ClassVar[Checked[T]]``; the trainer stores those
values in every checkpoint and refuses to resume with other ones. A new checked knob is one annotation,
not an entry in a second list."""

from __future__ import annotations

import typing
from typing import Annotated, ClassVar, TypeVar, get_args, get_origin

__all__ = ["Checked", "checked_knobs"]

_T = TypeVar("_T")
RESUME_CHECKED = "checked on resume"
Checked = Annotated[_T, RESUME_CHECKED]  # ClassVar[Checked[float]]: a knob whose value a resumed run must keep


def checked_knobs(cls: type) -> tuple[str, ...]:
    """Names of the class attributes of ``cls`` (and its bases) declared ``ClassVar[Checked[...]]``, sorted."""
    names = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if get_origin(hint) is ClassVar:
            hint = get_args(hint)[0]
        if get_origin(hint) is Annotated and RESUME_CHECKED in hint.__metadata__:
            names.append(name)
    return tuple(sorted(names))
