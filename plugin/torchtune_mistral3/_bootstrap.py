"""Interpreter-start hook, imported by ``torchtune_mistral3.pth``.

torchtune 0.6.1 has no plugin discovery: its recipe and config names come from a hard-coded list in
``torchtune._recipe_registry``. This module installs a tiny import hook that waits for that module to be
imported and then runs every entry point of the ``torchtune.plugins`` group, so any package can add recipes
and configs to the stock ``tune`` CLI. It imports nothing heavy: the cost at interpreter start is one
``sys.meta_path`` entry.
"""

import sys

_REGISTRY_MODULE = "torchtune._recipe_registry"
ENTRY_POINT_GROUP = "torchtune.plugins"


def load_plugins() -> None:
    """Call every ``torchtune.plugins`` entry point; a broken plugin warns and the others still load."""
    import warnings
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception as e:  # a plugin must never take the stock `tune` CLI down with it
            warnings.warn(
                f"torchtune plugin '{ep.name}' ({ep.value}) failed to register and is skipped: "
                f"{type(e).__name__}: {e}",
                stacklevel=2,
            )


class _AfterImport:
    """A ``sys.meta_path`` finder that runs ``load_plugins`` right after the registry module executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _REGISTRY_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # one-shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            load_plugins()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Install the hook once, or register at once if the registry is already imported."""
    if _REGISTRY_MODULE in sys.modules:
        load_plugins()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


install()
