"""Command-line override keys of a plugin config: refuse the ones nothing reads (``batchsize=2``), at start.

torchtune merges ``key=value`` overrides into the config without looking at the keys, so a misspelt key is
silently ignored. :func:`check_cli_keys` accepts an override key when

- the YAML config has it (at any depth), or
- the recipe reads it: the keys are found by scanning the recipe source files (the plugin recipe, the stock
  torchtune recipe it extends, and the modules that receive the whole config) for ``cfg.get("k", ...)``,
  ``cfg["k"]`` and ``cfg.k`` (``self._cfg`` too), so a key another change adds to the recipe is known
  without a list to keep up to date, or
- it is ``a.b`` and ``a`` is a ``_component_`` node whose callable takes an argument ``b``; a callable with
  ``**kwargs`` takes what the callee it hands them to takes (followed through its source: ``dataset.packd``
  is refused because ``medpix_dataset`` hands it to ``datasets.load_dataset``), or
- it is listed in ``allow_new_keys`` (``allow_new_keys=[my_key]``), for a key read by code the scan cannot see.

The planner and the Slurm printer check their overrides with :func:`check_override_keys` too.
:func:`check_config_values` refuses counts that are not positive integers and a learning rate that is not a
positive number, at start.
"""

import ast
import difflib
import importlib
import inspect
import textwrap
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


def _cfg_path(node: ast.AST, constants: Dict[str, str], aliases: Optional[Dict[str, str]] = None) -> Optional[str]:
    """Dotted config path that ``node`` reads, if it is rooted at ``cfg`` / ``self._cfg`` ("" for the root).

    ``aliases`` maps local names bound to a config node (``plan = cfg.get("plan", {}) or {}``) to its path.
    """
    aliases = aliases or {}
    if isinstance(node, ast.Name):
        return "" if node.id == "cfg" else aliases.get(node.id)
    if isinstance(node, ast.Attribute) and node.attr in ("cfg", "_cfg") and isinstance(node.value, ast.Name):
        return "" if node.value.id == "self" else None
    if isinstance(node, ast.Attribute):
        parent = _cfg_path(node.value, constants, aliases)
        return None if parent is None else f"{parent}.{node.attr}".lstrip(".")
    if isinstance(node, ast.Subscript):
        parent, key = _cfg_path(node.value, constants, aliases), _key_of(node.slice, constants)
        return None if parent is None or key is None else f"{parent}.{key}".lstrip(".")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
        parent, key = _cfg_path(node.func.value, constants, aliases), _key_of(node.args[0], constants)
        return None if parent is None or key is None else f"{parent}.{key}".lstrip(".")
    return None


def _aliases(tree: ast.Module, constants: Dict[str, str]) -> Dict[str, str]:
    """Names bound to a config node anywhere in the module: ``opt = cfg.get("optimizer", {}) or {}``."""
    aliases: Dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.values[0] if isinstance(node.value, ast.BoolOp) else node.value
            path = _cfg_path(value, constants, aliases)
            if path:
                aliases[node.targets[0].id] = path
    return aliases


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
        aliases = _aliases(tree, constants)
        methods = set()  # ``cfg.get`` itself is a method, not a key
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                methods.add(id(node.func))
        for node in ast.walk(tree):
            if id(node) in methods:
                continue
            path = _cfg_path(node, constants, aliases)
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


def _var_keyword(signature: inspect.Signature) -> Optional[str]:
    return next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)


def _spreads(node: ast.AST, name: str) -> bool:
    """True if ``node`` (the value of a ``**`` argument) hands on the dict ``name``: ``**name``, ``**{**a, **name}``."""
    if isinstance(node, ast.Name):
        return node.id == name
    return isinstance(node, ast.Dict) and any(k is None and _spreads(v, name) for k, v in zip(node.keys, node.values))


def _resolve(node: ast.AST, namespace: Dict[str, Any]) -> Any:
    """The object a ``Name`` or ``a.b.c`` expression names in ``namespace``, or None."""
    if isinstance(node, ast.Name):
        return namespace.get(node.id)
    if isinstance(node, ast.Attribute):
        parent = _resolve(node.value, namespace)
        return getattr(parent, node.attr, None) if parent is not None else None
    return None


def _load_dataset_keywords() -> Set[str]:
    """What ``datasets.load_dataset`` takes: its arguments and the fields of the builder configs (parquet, ...)."""
    import dataclasses

    import datasets
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    names = {p for p in inspect.signature(datasets.load_dataset).parameters}
    names |= {f.name for f in dataclasses.fields(datasets.BuilderConfig)}
    for module_name, _ in _PACKAGED_DATASETS_MODULES.values():
        module = importlib.import_module(module_name)
        for value in vars(module).values():
            is_config = isinstance(value, type) and issubclass(value, datasets.BuilderConfig)
            if is_config and dataclasses.is_dataclass(value):
                names |= {f.name for f in dataclasses.fields(value)}
    return names


def _keywords(
    fn: Any, bindings: Optional[Dict[str, Any]] = None, depth: int = 0, fixed: Optional[Dict[str, str]] = None
) -> Optional[Set[str]]:
    """Keyword arguments ``fn`` accepts, following its ``**kwargs`` to the call it hands them to; None for any.

    A builder that takes ``**kwargs`` and passes them on (``mistral3(**{**dims, **kwargs})``) accepts what its callee
    accepts, less the keywords it sets itself in that call (``medpix_dataset(..., source="parquet", **kwargs)``
    does not accept ``source``). ``bindings`` names the callables passed in as arguments (``_build_lora(mistral3,
    ...)`` calls ``builder(**model_kwargs)``). ``fixed`` collects the keywords a forwarding call sets itself, with
    the path of the callee they are set for.
    """
    try:
        signature = inspect.signature(fn)
    except (ValueError, TypeError):
        return None
    own = {p.name for p in signature.parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    var_kw = _var_keyword(signature)
    if var_kw is None:
        return own
    if getattr(fn, "__name__", None) == "load_dataset":
        import datasets

        if fn is datasets.load_dataset:  # its **config_kwargs go to the builder config: those fields
            return _load_dataset_keywords()
    if depth > 8:
        return None
    body = fn.__init__ if inspect.isclass(fn) else fn
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(body)))
    except (OSError, TypeError, SyntaxError):
        return None
    namespace = {**getattr(body, "__globals__", {}), **(bindings or {})}
    accepted: Optional[Set[str]] = None
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if not any(k.arg is None and _spreads(k.value, var_kw) for k in node.keywords):
            continue
        callee = _resolve(node.func, namespace)
        if callee is None:
            return None  # handed to something this cannot see: accept anything
        try:
            params = list(inspect.signature(callee).parameters)
        except (ValueError, TypeError):
            return None
        inner = {params[i]: _resolve(a, namespace) for i, a in enumerate(node.args) if i < len(params)}
        inner.update({k.arg: _resolve(k.value, namespace) for k in node.keywords if k.arg})
        further = _keywords(callee, {k: v for k, v in inner.items() if callable(v)}, depth + 1, fixed)
        if further is None:
            return None
        set_here = set(params[: len(node.args)]) | {k.arg for k in node.keywords if k.arg}
        if fixed is not None:
            fixed.update({k: _public_path(callee) for k in set_here & further})
        further -= set_here
        accepted = further if accepted is None else accepted & further
    return None if accepted is None else own | accepted


def _parameters(component: Any) -> Optional[List[str]]:
    """Argument names of a ``_component_`` callable (through its ``**kwargs``), or None when it takes any."""
    try:
        target = _get_component_from_path(str(component))
    except (ValueError, TypeError, ImportError, AttributeError):
        return None
    names = _keywords(target)
    return None if names is None else sorted(names)


def _public_path(fn: Any) -> str:
    """``torchtune_mistral3.datasets.medpix_dataset`` for a function of ``torchtune_mistral3.datasets._medpix``."""
    module, name = getattr(fn, "__module__", ""), getattr(fn, "__qualname__", str(fn))
    parts = module.split(".")
    for end in range(1, len(parts) + 1):
        package = ".".join(parts[:end])
        try:
            if getattr(importlib.import_module(package), name, None) is fn:
                return f"{package}.{name}"
        except ImportError:
            continue
    return f"{module}.{name}"


def _set_by(component: Any) -> Dict[str, str]:
    """Arguments a component sets itself in the call it hands its ``**kwargs`` to, with that callee's path.

    ``medpix_sample_dataset`` sets ``source`` of ``medpix_dataset``.
    """
    fixed: Dict[str, str] = {}
    try:
        _keywords(_get_component_from_path(str(component)), fixed=fixed)
    except (ValueError, TypeError, ImportError, AttributeError):
        pass
    return fixed


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
        section = ".".join(parts[: depth + 1])
        if depth + 1 < len(parts) and any(k.startswith(section + ".") for k in known):
            in_yaml, in_merged = None, _child(in_merged, part)  # a section the config leaves out: its known keys
            continue
        if depth > 0 and in_yaml is None and ".".join(parts[:depth]) in known and not siblings:
            return None  # a section the recipe reads whole but the config leaves out: nothing to check it against
        return sorted(siblings - {"_component_"})
    return None


def check_override_keys(
    yaml: DictConfig, merged: DictConfig, overrides: Sequence[str], recipe_files: Iterable[str], where: str
) -> None:
    """Refuse override keys that neither the config nor the recipe nor its components know.

    Args:
        yaml (DictConfig): the config file as written (which keys exist).
        merged (DictConfig): the config with the overrides (which component each node is).
        overrides (Sequence[str]): the override keys (without values).
        recipe_files (Iterable[str]): source files whose ``cfg`` reads count as known keys (the plugin recipe
            and the stock recipe it extends; the planner adds its own).
        where (str): where the overrides were given, for the message ("on the command line").

    Raises:
        ValueError: naming every unknown key with the closest valid one, and how to add a new key.
    """
    if not overrides:
        return
    known = recipe_keys([Path(f) for f in recipe_files] + _module_files(_STOCK_CFG_READERS + _PLUGIN_CFG_READERS))
    known.add(ALLOW_KEY)
    allowed = {str(k) for k in (merged.get(ALLOW_KEY, None) or [])}
    problems = []
    for key in overrides:
        if key in allowed or key.split(".")[0] in allowed:
            continue
        candidates = _unknown(key, yaml, merged, known)
        if candidates is None:
            continue
        last = key.split(".")[-1]
        close = difflib.get_close_matches(last, candidates, n=1)
        parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
        hint = f" (did you mean {parent}{close[0]}?)" if close else ""
        node = OmegaConf.select(merged, parent.rstrip("."), default=None) if parent else None
        if isinstance(node, DictConfig) and "_component_" in node:
            callee = _set_by(node["_component_"]).get(last)
            if callee:
                hint = (f" ({node['_component_']} sets {last} itself; to choose it, use the component it calls: "
                        f"{parent.rstrip('.')}={callee} {key}=...)")
        problems.append(f"{key}{hint}")
    if problems:
        raise ValueError(
            f"Unknown config key(s) {where}: {', '.join(problems)}. Neither the config nor the "
            "recipe or its components read them, so they would be ignored or fail later. Fix the spelling; to add a "
            f"genuinely new key, put it in your copy of the config (tune cp) or list it: {ALLOW_KEY}=[key]"
        )


def training_recipe_files(cfg: DictConfig) -> List[str]:
    """The recipe files a training config's keys are checked against, by the planner and the Slurm printer.

    ``full_finetune_distributed``, and for a LoRA model builder ``lora_finetune_distributed`` too: the plugin's
    recipe classes (``finetune/``, read as files, not imported) and the stock recipes they extend.

    Args:
        cfg (DictConfig): the config.

    Returns:
        List[str]: source file paths.
    """
    from ._stock import stock_recipe_path

    finetune = Path(__file__).resolve().parent.parent / "finetune"
    recipes = {"full_finetune_distributed": "_full.py"}
    if "_lora" in str((cfg.get("model", None) or {}).get("_component_", "")):
        recipes["lora_finetune_distributed"] = "_lora.py"
    return [str(finetune / f) for f in recipes.values()] + [str(stock_recipe_path(n)) for n in recipes]


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
    check_override_keys(yaml, cfg, overrides, recipe_files, where="on the command line")


# keys that count something: a positive integer, or null where the recipe reads null as "off" / "all"
_COUNTS = {
    "epochs": "the passes over the training data",
    "batch_size": "samples (or packs) per data-parallel rank and step",
    "batch_size_val": "validation samples per batch",
    "gradient_accumulation_steps": "batches per optimizer step",
    "max_steps_per_epoch": "optimizer steps per epoch (null: the whole epoch)",
    "run_val_every_n_steps": "steps between validations (null: no validation)",
    "max_val_steps": "validation batches (null: all)",
    "save_every_n_steps": "steps between checkpoints (null: at the end of each epoch only)",
    "log_every_n_steps": "steps between logged metrics",
    "pipeline_microbatches": "micro-batches per pipeline step",
    "tensor_parallel_dim": "GPUs per tensor-parallel group",
    "pipeline_parallel_dim": "pipeline stages",
    "batch_size_generate": "prompts per generation batch",
    "max_rows": "rows answered (null: all)",
    "max_new_tokens": "tokens per generated answer",
}
_NULLABLE = {"max_steps_per_epoch", "run_val_every_n_steps", "max_val_steps", "save_every_n_steps", "max_rows",
             "pipeline_microbatches", "batch_size_val"}
# keys that are positive real numbers
_POSITIVE = {"optimizer.lr": "the learning rate"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config_values(cfg: DictConfig, counts: Iterable[str] = tuple(_COUNTS)) -> None:
    """Refuse values a run would misread or fail on late, at start.

    Counts must be positive integers, the learning rate a positive number. Keys absent from the config are not
    checked.

    ``epochs=0`` would save the untrained model, ``max_steps_per_epoch=0`` save it as ``epoch_0``,
    ``run_val_every_n_steps=-1`` validate every step, ``gradient_accumulation_steps=0`` divide by zero after the
    model is built, ``optimizer.lr=fast`` fail inside the optimizer.

    Args:
        cfg (DictConfig): the merged config.
        counts (Iterable[str]): the count keys to check (default: every key the plugin's recipes count with).

    Raises:
        ValueError: naming every wrong key, its value and what it counts.
    """
    problems = []
    for key in counts:
        if key not in cfg:
            continue
        value = cfg.get(key)
        if value is None and key in _NULLABLE:
            continue
        if not _is_int(value) or value < 1:
            null = " or null" if key in _NULLABLE else ""
            problems.append(f"{key}={value!r} ({_COUNTS[key]}) must be a positive integer{null}")
    for key, what in _POSITIVE.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            problems.append(f"{key}={value!r} ({what}) must be a positive number, e.g. {key}=2e-5")
    if problems:
        raise ValueError("Invalid config value(s): " + "; ".join(problems) + ".")
