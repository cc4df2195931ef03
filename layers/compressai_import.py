"""Import CompressAI without PyTorch Geometric, torchvision and pandas: seconds and about 400 MB less a process.

CompressAI 1.2.8 imports ``torch_geometric`` (for its point-cloud transforms), ``torchvision`` (to list its
transforms in a registry of names) and ``pandas`` (for a point-cloud dataset) when it is imported, none of which
image compression runs: with them, ``import compressai`` takes about 300-400 MB of memory and several seconds, more
than torch itself. ``load()`` imports ``compressai`` once with stand-ins for those packages, then removes the
stand-ins from ``sys.modules``, so that a later import of any of them (by the user, in the same process) imports
the real one. Only CompressAI's point-cloud code and its registry of transform names (``compressai.registry``) see
the stand-ins; using one raises ImportError naming this module. A package already imported is used as it is, and
where the stand-ins do not satisfy CompressAI it is imported as usual.
"""

import importlib.abc
import importlib.machinery
import sys
import types

PACKAGES = ("torch_geometric", "torchvision", "pandas")


class _Missing:
    """A class of a package that was not imported."""

    def __init__(self, *args, **kwargs):
        raise ImportError(f"{type(self).__module__}.{type(self).__name__}: CompressAI was imported without it "
                          "(layers/compressai_import.py); import that package before this project to use it")


def _functional_transform(name):
    return lambda cls: cls


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "functional_transform":
            return _functional_transform
        value = type(name, (_Missing,), {"__module__": self.__name__})
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages):
        self.packages = packages

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _forget(prefixes):
    for name in [n for n in sys.modules if any(n == p or n.startswith(p + ".") for p in prefixes)]:
        del sys.modules[name]


def load():
    """Import ``compressai`` (once) as the module docstring says; returns the module."""
    if "compressai" in sys.modules:
        return sys.modules["compressai"]
    absent = tuple(p for p in PACKAGES if p not in sys.modules)
    finder = _Finder(absent)
    sys.meta_path.insert(0, finder)
    try:
        import compressai  # noqa: F401
    except Exception:
        compressai = None
    finally:
        sys.meta_path.remove(finder)
        _forget(absent)
    if compressai is None:  # a CompressAI that needs more of them: the usual import
        _forget(["compressai"])
        import compressai
    return compressai
