"""Resolve a ``"package.module:factory"`` spec to the callable it names.

Models (:mod:`fedmq.task.models`) and a worker's own data (``--data package.module:factory``)
are both named this way. Importing a module runs its code, so callers decide first whether the
spec is one their operator trusts; this module only imports and looks up.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

# A dotted module path, a colon, a dotted attribute path: "pkg.mod:make" or "pkg.mod:Zoo.make".
_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def looks_like_factory(spec: str) -> bool:
    """True when ``spec`` has the ``package.module:factory`` form (nothing is imported)."""
    return bool(_SPEC.match(spec.strip()))


def resolve_factory(spec: str, *, what: str = "model") -> Callable[..., object]:
    """The callable named by ``spec``; ``what`` ("model", "data") starts every error message.

    Raises ValueError for a malformed spec, a module that cannot be imported or a missing
    attribute, and TypeError when the attribute is not callable.
    """
    module_name, _, attribute = spec.strip().partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} spec {spec!r} must have the form 'package.module:factory'")
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{what} spec {spec!r}: cannot import module {module_name!r}: {error}") from error
    # A dotted attribute ("module:Class.create") walks down from the module.
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as error:
            raise ValueError(
                f"{what} spec {spec!r}: module {module_name!r} has no attribute {attribute!r}"
            ) from error
    if not callable(target):
        raise TypeError(f"{what} spec {spec!r}: {attribute!r} is not callable")
    return target
