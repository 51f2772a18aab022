"""TensorFlow's start-up on every platform: the devices it sees, and a plugin that fails costs one line.

TensorFlow loads every library in ``site-packages/tensorflow-plugins`` while it is being imported;
on Apple silicon that is ``tensorflow-metal``, the Metal GPU plugin. A plugin built for another
TensorFlow release fails to load, and takes ``import tensorflow`` down with it. ``guard_plugins``
(installed by ``steps/__init__.py``, before anything imports TensorFlow) turns that failure into
one warning line on stderr and lets TensorFlow start on the CPU. It also keeps TensorFlow's import
quiet unless ``TF_CPP_MIN_LOG_LEVEL`` asks for its log (below 2): TensorFlow 2.21 writes its oneDNN
and CUDA-probe notes through absl before absl is set up, past that variable, so stderr is pointed
at ``/dev/null`` for the import alone. ``describe`` names the devices TensorFlow sees; ``train``,
``evaluate`` and ``infer`` log it as they start.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from steps.core.errors import first_line

# The TensorFlow module whose functions load the plugins; wrapped as soon as it is executed.
LOADER_MODULE = "tensorflow.python.framework.load_library"
PLUGIN_DIR = "tensorflow-plugins"
# One line per plugin directory that did not load, as printed.
FAILED: list[str] = []


class _PluginGuard(importlib.abc.MetaPathFinder):
    """Finds ``LOADER_MODULE`` as Python would and wraps its loaders once the module has run; finds
    ``tensorflow`` and runs it with stderr quiet (``_quiet``)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in (LOADER_MODULE, "tensorflow"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                run = spec.loader.exec_module  # a loader of its own for this spec: safe to wrap

                def exec_module(module: ModuleType, run: Any = run) -> None:
                    if module.__name__ == "tensorflow":
                        with _quiet():
                            run(module)
                        return
                    run(module)
                    _wrap(module)

                spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                return spec
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """File descriptor 2 to ``/dev/null`` while the block runs, unless TensorFlow's log was asked for;
    a plugin's warning line made meanwhile is printed after."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") < "2":
        yield
        return
    before = len(FAILED)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        for line in FAILED[before:]:
            print(line, file=sys.stderr, flush=True)


def guard_plugins() -> None:
    """Install the guard (once); a no-op when TensorFlow is already imported."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _PluginGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _PluginGuard())


def _wrap(module: ModuleType) -> None:
    for name in ("load_library", "load_pluggable_device_library"):
        original = getattr(module, name, None)
        if original is not None:
            setattr(module, name, _guarded(original))


def _guarded(load: Any) -> Any:
    def guarded(location: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return load(location, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - TensorFlow raises NotFoundError, OSError, ...
            if PLUGIN_DIR not in str(location):
                raise  # TensorFlow's own kernels: a broken install, not a plugin
            if not any(str(location) in line for line in FAILED):
                first = first_line(err, 300)
                line = (
                    f"warning: the TensorFlow plugin in {location} did not load ({first}); running on the CPU. "
                    "tensorflow-metal must suit the installed TensorFlow: pip install -U tensorflow-metal, "
                    "or pip uninstall tensorflow-metal"
                )
                FAILED.append(line)
                print(line, file=sys.stderr, flush=True)
            return None

    return guarded


def describe() -> str:
    """``TensorFlow 2.21.0 on CPU:0, GPU:0``: the devices TensorFlow sees, and any plugin it could not load."""
    import tensorflow as tf

    devices = ", ".join(d.name.removeprefix("/physical_device:") for d in tf.config.list_physical_devices())
    failed = f"; a plugin did not load, see the warning above ({len(FAILED)})" if FAILED else ""
    return f"TensorFlow {tf.__version__} on {devices}{failed}"
