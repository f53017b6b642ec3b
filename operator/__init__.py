"""Kubernetes operator for MoEService resources (`moeserve.operator`). Never imports torch."""

if __name__ == "operator":
    # `python -m ...` and `python -c ...` put the current directory first on sys.path, so from the
    # repository root `import operator` would find this folder instead of the standard library's module
    # (and break enum, re, collections...). Load the standard library's module under its own name
    # instead; importlib returns whatever sys.modules holds once this body ends. Only sys, os and
    # importlib.machinery are used here, since they import nothing that needs `operator`.
    import os as _os
    import sys as _sys
    from importlib.machinery import ModuleSpec as _ModuleSpec
    from importlib.machinery import SourceFileLoader as _SourceFileLoader

    _path = _os.path.join(_os.path.dirname(_os.__file__), "operator.py")
    _loader = _SourceFileLoader("operator", _path)
    _stdlib = type(_sys)("operator")
    _stdlib.__spec__ = _ModuleSpec("operator", _loader, origin=_path)
    _stdlib.__file__ = _path
    _stdlib.__loader__ = _loader
    _sys.modules["operator"] = _stdlib
    _loader.exec_module(_stdlib)
