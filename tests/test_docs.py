"""Every public definition of loradex has a docstring, as ``help()`` sees it.

Counted: module-level functions and classes defined in the module (not re-exports), and the public
methods, static/class methods and properties of those classes. A docstring inherited from a base
class counts (``help()`` shows it); the signature-only ``__doc__`` that ``dataclasses`` and
``NamedTuple`` generate for an undocumented class does not.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import pkgutil

import loradex

# Modules checked: an exact module name, or ``pkg.*`` for everything below a package. The other
# modules were added as their owners finished documenting them (issue 11, item 6); now all are.
CHECKED = ("loradex", "loradex.*")  # every module of the package


def _checked(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CHECKED)


def _class_doc(cls: type) -> str | None:
    """The class's own docstring, or None when it has none or only a generated signature."""
    doc = cls.__doc__
    if not doc or not doc.strip():
        return None
    fields = getattr(cls, "__dataclass_fields__", None) or getattr(cls, "_fields", None)
    if fields is not None and doc.startswith(cls.__name__ + "("):
        return None  # dataclasses / NamedTuple write "Name(field: type, ...)" when there is no docstring
    return doc


def _property_doc(cls: type, name: str, prop: property) -> str | None:
    """A property's docstring, or the one of the property it overrides in a base class."""
    for klass in cls.__mro__:
        candidate = vars(klass).get(name)
        if isinstance(candidate, property) and candidate.__doc__:
            return candidate.__doc__
    return prop.__doc__


def _members(cls: type):
    """(name, docstring) of the public methods and properties a class defines itself."""
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(raw, property):
            yield name, _property_doc(cls, name, raw)
            continue
        func = getattr(raw, "__func__", raw)  # staticmethod / classmethod
        if inspect.isfunction(func):
            yield name, inspect.getdoc(getattr(cls, name))  # inherits the overridden method's doc


def undocumented(module) -> list[str]:
    """Dotted names of the public definitions of ``module`` that have no docstring."""
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            if not inspect.getdoc(obj):
                missing.append(f"{module.__name__}.{name}")
        elif inspect.isclass(obj):
            if not _class_doc(obj):
                missing.append(f"{module.__name__}.{name}")
            missing += [f"{module.__name__}.{name}.{m}" for m, doc in _members(obj) if not doc]
    return missing


def _modules():
    yield loradex
    for info in pkgutil.walk_packages(loradex.__path__, "loradex."):
        yield importlib.import_module(info.name)


def test_checked_patterns_name_real_modules():
    names = [m.__name__ for m in _modules()]
    unused = [p for p in CHECKED if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    assert not unused, f"CHECKED entries that match no module: {unused}"


def test_public_definitions_have_docstrings():
    missing = []
    for module in _modules():
        if _checked(module.__name__):
            missing += undocumented(module)
    assert not missing, f"{len(missing)} public definitions without a docstring:\n" + "\n".join(missing)
