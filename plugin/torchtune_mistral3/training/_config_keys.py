"""Command-line override keys of a plugin config: refuse the ones nothing reads (``batchsize=2``), at start.

torchtune merges ``key=value`` overrides into the config without looking at the keys, so a misspelt key is
silently ignored. :func:`check_cli_keys` accepts an override key when

- the YAML config has it (at any depth), or
- the recipe reads it: the keys are found by scanning the recipe source files (the plugin recipe, the stock
  torchtune recipe it extends, and the modules that receive the whole config) for ``cfg.get("k", ...)``,
  ``cfg["k"]`` and ``cfg.k`` (``self._cfg`` too), so a key another change adds to the recipe is known
  without a list to keep up to date, or
- it is ``a.b`` and ``a`` is a ``_component_`` node whose callable takes an argument ``b`` (or ``**kwargs``), or
- it is listed in ``allow_new_keys`` (``allow_new_keys=[my_key]``), for a key read by code the scan cannot see.
"""

import ast
import difflib
import importlib
import inspect
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune.config._parse import TuneRecipeArgumentParser
from torchtune.config._utils import _get_component_from_path

ALLOW_KEY = "allow_new_keys"

# torchtune modules the stock recipe hands the whole config to (their reads count as the recipe's)
_STOCK_CFG_READERS = ("torchtune.training.checkpointing._checkpoint_client",)
_PLUGIN_CFG_READERS = ("torchtune_mistral3.training",)


def _module_files(names: Iterable[str]) -> List[Path]:
    """Source files of modules or (all modules of) packages, by dotted name."""
    files = []
    for name in names:
        module = importlib.import_module(name)
        path = Path(inspect.getsourcefile(module))
        files += sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    return files


def _constants(tree: ast.Module) -> Dict[str, str]:
    """String constants a module defines or imports by name (``PROFILER_KEY = "profiler"``)."""
    names: Dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            names.update({t.id: node.value.value for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                try:
                    value = getattr(importlib.import_module(node.module), alias.name, None)
                except ImportError:
                    continue
                if isinstance(value, str):
                    names[alias.asname or alias.name] = value
    return names


def _key_of(node: ast.AST, constants: Dict[str, str]) -> Optional[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def _cfg_path(node: ast.AST, constants: Dict[str, str]) -> Optional[str]:
    """Dotted config path that ``node`` reads, if it is rooted at ``cfg`` / ``self._cfg`` ("" for the root)."""
    if isinstance(node, ast.Name):
        return "" if node.id == "cfg" else None
    if isinstance(node, ast.Attribute) and node.attr in ("cfg", "_cfg") and isinstance(node.value, ast.Name):
        return "" if node.value.id == "self" else None
    if isinstance(node, ast.Attribute):
        parent = _cfg_path(node.value, constants)
        return None if parent is None else f"{parent}.{node.attr}".lstrip(".")
    if isinstance(node, ast.Subscript):
        parent, key = _cfg_path(node.value, constants), _key_of(node.slice, constants)
        return None if parent is None or key is None else f"{parent}.{key}".lstrip(".")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
        parent, key = _cfg_path(node.func.value, constants), _key_of(node.args[0], constants)
        return None if parent is None or key is None else f"{parent}.{key}".lstrip(".")
    return None


def recipe_keys(files: Iterable[Path]) -> Set[str]:
    """Every config path the given source files read from ``cfg`` (``"batch_size"``, ``"optimizer.fused"``).

    Args:
        files (Iterable[Path]): Python source files.

    Returns:
        Set[str]: dotted paths.
    """
    keys: Set[str] = set()
    for file in files:
        tree = ast.parse(Path(file).read_text(), filename=str(file))
        constants = _constants(tree)
        methods = set()  # ``cfg.get`` itself is a method, not a key
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                methods.add(id(node.func))
        for node in ast.walk(tree):
            if id(node) in methods:
                continue
            path = _cfg_path(node, constants)
            if path:
                keys.add(path)
    return keys


def cli_overrides(argv: Sequence[str]) -> List[str]:
    """The ``key=value`` overrides of a recipe command line, as torchtune's parser separates them from ``--config``.

    Args:
        argv (Sequence[str]): the recipe's arguments (``sys.argv[1:]``).

    Returns:
        List[str]: the override keys (without value), removals (``~key``) left out.
    """
    parser = TuneRecipeArgumentParser(add_help=False)
    _, overrides = parser.parse_known_args(list(argv))
    return [arg.split("=", 1)[0] for arg in overrides if "=" in arg and not arg.startswith("~")]


def _parameters(component: Any) -> Optional[List[str]]:
    """Argument names of a ``_component_`` callable, or None when it takes ``**kwargs`` (or cannot be inspected)."""
    try:
        signature = inspect.signature(_get_component_from_path(str(component)))
    except (ValueError, TypeError, ImportError, AttributeError):
        return None
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def _child(node: Any, part: str) -> Any:
    """``node[part]`` for a config node, or None when absent."""
    if isinstance(node, DictConfig) and part in node:
        return node[part]
    if isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


def _unknown(key: str, yaml: DictConfig, merged: DictConfig, known: Set[str]) -> Optional[List[str]]:
    """None if ``key`` is valid, else the valid keys at the level where it goes wrong (for the suggestion).

    ``yaml`` says which keys exist; ``merged`` (with the overrides) says which component a node is, so that
    ``optimizer=torch.optim.SGD optimizer.momentum=0.9`` checks ``momentum`` against SGD.
    """
    parts = key.split(".")
    if key in known:
        return None
    in_yaml, in_merged = yaml, merged
    for depth, part in enumerate(parts):
        siblings = {
            k.split(".")[depth] for k in known if k.count(".") >= depth and k.split(".")[:depth] == parts[:depth]
        }
        if isinstance(in_yaml, DictConfig):
            siblings |= {str(k) for k in in_yaml.keys()}
        if isinstance(in_merged, DictConfig) and "_component_" in in_merged and part != "_component_":
            params = _parameters(in_merged["_component_"])
            if params is None or part in params:
                return None
            siblings |= set(params)
        if _child(in_yaml, part) is not None or (isinstance(in_yaml, DictConfig) and part in in_yaml):
            in_yaml, in_merged = _child(in_yaml, part), _child(in_merged, part)
            continue
        if depth > 0 and in_yaml is None and ".".join(parts[:depth]) in known:
            return None  # a section the recipe reads but the config leaves out: nothing to check it against
        return sorted(siblings - {"_component_"})
    return None


def check_cli_keys(cfg: DictConfig, argv: Sequence[str], recipe_files: Iterable[str]) -> None:
    """Refuse command-line override keys that neither the config nor the recipe nor its components know.

    Args:
        cfg (DictConfig): the merged config (YAML plus overrides).
        argv (Sequence[str]): the recipe's command-line arguments (``sys.argv[1:]``).
        recipe_files (Iterable[str]): the recipe source files whose ``cfg`` reads count as known keys (the
            plugin recipe and the stock recipe it extends).

    Raises:
        ValueError: naming every unknown key with the closest valid one, and how to add a new key.
    """
    overrides = cli_overrides(argv)
    if not overrides:
        return
    config_file = TuneRecipeArgumentParser(add_help=False).parse_known_args(list(argv))[0]
    yaml = OmegaConf.create({k: v for k, v in vars(config_file).items()})
    known = recipe_keys([Path(f) for f in recipe_files] + _module_files(_STOCK_CFG_READERS + _PLUGIN_CFG_READERS))
    known.add(ALLOW_KEY)
    allowed = {str(k) for k in (cfg.get(ALLOW_KEY, None) or [])}
    problems = []
    for key in overrides:
        if key in allowed or key.split(".")[0] in allowed:
            continue
        candidates = _unknown(key, yaml, cfg, known)
        if candidates is None:
            continue
        last = key.split(".")[-1]
        close = difflib.get_close_matches(last, candidates, n=1)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f" (did you mean {parent}{close[0]}?)" if close else ""
        problems.append(f"{key}{hint}")
    if problems:
        raise ValueError(
            f"Unknown config key(s) on the command line: {', '.join(problems)}. Neither the config nor the "
            "recipe or its components read them, so they would be ignored. Fix the spelling; to add a "
            f"genuinely new key, put it in your copy of the config (tune cp) or list it: {ALLOW_KEY}=[key]"
        )
