"""Config loading: ml-collections `get_config(arg)` files plus `--config.key=value` overrides.

Every command takes `--config path.py[:arg]`. A bare name (`--config scenes`) is looked up in the
repository's `configs/` folder, so commands run on their embedded defaults with no arguments.
Shared defaults live in `configs/common.py`; the other config files start from it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """Split `path.py[:arg]` and find the file (a bare name means `configs/<name>.py`)."""
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.suffix:
        path = CONFIG_DIR / f"{path_str}.py"
    if not path.exists() and not path.is_absolute() and (CONFIG_DIR / path.name).exists():
        path = CONFIG_DIR / path.name
    if not path.exists():
        raise FileNotFoundError(
            f"config file {path} not found (from --config {spec!r}); known configs: "
            f"{sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem != '__init__')}"
        )
    return path, (arg or None)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]` and apply `key=value` overrides (the same syntax as `--config.key=value`)."""
    path, arg = resolve_config_path(spec)
    module_name = f"_fourm_config_{path.stem}_{abs(hash(str(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key=value")
        apply_override(cfg, key.removeprefix("--config.").removeprefix("config."), value)
    import_user_modules(cfg)
    return cfg


def import_user_modules(cfg) -> list[str]:
    """Import the modules named by the config field `modules` (and the `fourm.modalities` entry
    points): users' own fields and modalities are registered before any data or model is touched."""
    from fourm import modalities

    mods = cfg.get("modules", ()) if hasattr(cfg, "get") else ()
    return modalities.load_modules((mods,) if isinstance(mods, str) else tuple(mods or ()))


def apply_override(cfg: ml_collections.ConfigDict, dotted_key: str, value: str) -> None:
    """Set `cfg.a.b = value`, parsing value with the type of the existing field."""
    *parents, leaf = dotted_key.split(".")
    node = cfg
    for p in parents:
        if p not in node:
            raise KeyError(f"config has no field {dotted_key!r} (missing {p!r})")
        node = node[p]
    if leaf not in node:
        raise KeyError(f"config has no field {dotted_key!r}; fields here: {sorted(node.keys())}")
    node[leaf] = _parse_like(node[leaf], value, dotted_key)


def _parse_like(current: Any, value: str, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if value.lower() in ("1", "true", "yes"):
                return True
            if value.lower() in ("0", "false", "no"):
                return False
            raise ValueError(value)
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
        if isinstance(current, str) or current is None:
            return value
        if isinstance(current, (tuple, list)):
            parsed = json.loads(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v]
            if current and not isinstance(current[0], str):
                parsed = [type(current[0])(v) for v in parsed]
            return type(current)(parsed)
    except (ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"--config.{key}: cannot parse {value!r} as {type(current).__name__}") from e
    raise ValueError(f"--config.{key}: cannot override a field of type {type(current).__name__}")


def define_config_flag(default: str, help_text: str = "ml-collections config file, path.py[:arg] "
                       "or a name in configs/ (e.g. pretrain:smoke)"):
    """Define absl's `--config` flag (with `--config.key=value` overrides) defaulting to `default`.

    Like ml-collections' DEFINE_config_file, except that a bare name (`--config pretrain:smoke`)
    is looked up in the repository's configs/ folder, on the command line as for the default.
    """
    from absl import flags
    from ml_collections.config_flags import config_flags

    class _Holder(flags.FlagHolder):
        @property
        def value(self):  # the first read of the config imports the user's modules
            cfg = super().value
            import_user_modules(cfg)
            return cfg

    if "config" in flags.FLAGS:
        # A command that uses another command's module as a library (the quickstart imports the
        # text-tokenizer corpus): one --config flag per process, the first command's.
        return _Holder(flags.FLAGS, flags.FLAGS["config"])

    class _Parser(config_flags.ConfigFileFlagParser):
        def parse(self, value):
            path, arg = resolve_config_path(value)
            return lists_to_tuples(super().parse(f"{path}:{arg}" if arg is not None else str(path)))

    path, arg = resolve_config_path(default)
    spec = f"{path}:{arg}" if arg else str(path)
    flag = config_flags._ConfigFlag(  # noqa: SLF001  (the documented flag class, own parser)
        parser=_Parser(name="config", lock_config=False), serializer=flags.ArgumentSerializer(),
        name="config", default=spec, help_string=help_text, flag_values=flags.FLAGS,
        accept_new_attributes=False, sys_argv=None)
    flags.DEFINE_flag(flag, flags.FLAGS)
    return _Holder(flags.FLAGS, flag)


def lists_to_tuples(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Turn list fields into tuples, in place: ml-collections' `--config.key=value` overrides
    refuse list fields but take tuples, one flag per element (`--config.modalities=rgb@64
    --config.modalities=caption`) or a literal (`--config.modalities="('rgb@64', 'caption')"`)."""
    for key, value in cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            lists_to_tuples(value)
        elif isinstance(value, list):
            del cfg[key]  # re-create the field: assigning a tuple to a list field keeps a list
            cfg[key] = tuple(value)
    return cfg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """Resolved config as JSON (written next to checkpoints and artifacts)."""
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def common_config() -> ml_collections.ConfigDict:
    """The shared defaults of `configs/common.py`; other config files start from these."""
    return load_config(str(CONFIG_DIR / "common.py"))
