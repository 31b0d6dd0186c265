"""Config loading: ml-collections `get_config(arg)` files plus `--config.key=value` overrides.

Every command takes `--config path.py[:arg]`. A bare name (`--config scenes`) is looked up in the
repository's `configs/` folder, so commands run on their embedded defaults with no arguments.
Shared defaults live in `configs/common.py`; the other config files start from it.
"""

from __future__ import annotations

import ast
import difflib
import json
from pathlib import Path
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections.config_flags import config_flags, config_path

from fourm import modalities as registry

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


class ConfigKeyError(flags.Error, ValueError):
    """A `--config.KEY` override names a field the config does not have."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]` and apply `key=value` overrides, through the same ml-collections config
    flag the commands use (`--config.key=value`), so a value parses the same way everywhere."""
    argv = override_args(["load_config", f"--config={spec}"]
                         + [f"--config.{o.removeprefix('--config.').removeprefix('config.')}"
                            for o in overrides])
    fv = flags.FlagValues()
    try:
        holder = define_config_flag(spec, fv, argv)
        fv(argv)
    except flags.Error as e:
        raise ValueError(str(e)) from None
    return holder.value


def override_args(argv: Sequence[str], name: str = "config") -> list[str]:
    """Quote override path parts that are not Python identifiers, for ml-collections' path parser:
    `--config.image_tokenizers.tok_depth@64=DIR` -> `--config.image_tokenizers["tok_depth@64"]=DIR`
    (modality names carry `@`, which it would read as an operator)."""
    out = []
    prefix = f"--{name}."
    for a in argv:
        if a.startswith(prefix) and "[" not in a.split("=", 1)[0]:
            path, eq, value = a[len(prefix):].partition("=")
            parts = [p if p.isidentifier() else f'["{p}"]' for p in path.split(".")]
            a = prefix + "".join(p if p.startswith("[") or i == 0 else "." + p
                                 for i, p in enumerate(parts)) + eq + value
        out.append(a)
    return out


def dotted_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every field of a config as a dotted path (`optim.lr`)."""
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys += dotted_keys(v, prefix + k + ".")
    return keys


def _is_modality_name(name: str) -> bool:
    from fourm import modalities

    for family in ("fourm", "ml4m"):
        try:
            modalities.get(name, family)
            return True
        except (KeyError, ValueError):
            continue
    return False


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


def check_override_keys(cfg: ml_collections.ConfigDict, overrides: Sequence[str],
                        argv: Sequence[str], name: str = "config") -> None:
    """Raise ConfigKeyError for an override of a field the config lacks, naming the nearest known
    field. A new key in a per-modality section (`image_tokenizers`, `vocab_overrides`, alphas, ...)
    is added when it is a registered modality name, typed like its siblings (or from the value)."""
    values = {}
    for a in argv:
        if a.startswith(f"--{name}.") and "=" in a:
            k, _, v = a[len(name) + 3:].partition("=")
            values[k] = v
    for path in overrides:
        parts = config_path.split(path)
        node = cfg
        for i, part in enumerate(parts):
            if isinstance(node, ml_collections.ConfigDict) and part in node:
                node = node[part]
                continue
            if not isinstance(node, ml_collections.ConfigDict):
                break  # a sequence index or a dataclass: ml-collections reports those itself
            dotted = ".".join(str(p) for p in parts[:i + 1])
            if i == len(parts) - 1 and isinstance(part, str) and _is_modality_name(part):
                siblings = list(node.values())
                value = _literal(values.get(path, ""))
                node[part] = type(siblings[0])() if siblings and not isinstance(
                    siblings[0], ml_collections.ConfigDict) else value
                break
            known = dotted_keys(cfg)
            near = (difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
                    or difflib.get_close_matches(dotted, known, n=1, cutoff=0.0))
            hint = f"; did you mean --{name}.{near[0]}?" if near else ""
            raise ConfigKeyError(f"--{name}.{'.'.join(map(str, parts))}: unknown config key "
                                 f"{dotted!r}{hint}")


def define_config_flag(default: str, flag_values=None, argv: Sequence[str] | None = None,
                       help_text: str = "ml-collections config file, path.py[:arg] or a name in "
                       "configs/ (e.g. pretrain:smoke); override fields with --config.KEY=VALUE"):
    """Define the `--config` flag (with `--config.key=value` overrides) defaulting to `default`.

    ml-collections' config-file flag, except that a bare name (`--config pretrain:smoke`) is looked
    up in the repository's configs/ folder, list fields become tuples (its overrides refuse lists),
    an unknown key is an error naming the nearest known one, and keys may be modality names with
    `@` (pass `argv` through `override_args`). `argv` is the command line being parsed (default
    sys.argv); `flag_values` the FlagValues to define it on (default absl's global one).
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values

    class _Parser(config_flags.ConfigFileFlagParser):
        def parse(self, value):
            path, arg = resolve_config_path(value)
            return lists_to_tuples(super().parse(f"{path}:{arg}" if arg is not None else str(path)))

    class _Flag(config_flags._ConfigFlag):  # noqa: SLF001  (the documented flag class)
        def _initialize_missing_parent_fields(self, config, overrides):
            # The user's modalities first: override keys may name them (image_tokenizers.tok_x@32).
            import_user_modules(config, self._GetArgv(), self.name)
            check_override_keys(config, overrides, self._GetArgv(), self.name)
            super()._initialize_missing_parent_fields(config, overrides)

    path, arg = resolve_config_path(default)
    spec = f"{path}:{arg}" if arg else str(path)
    flag = _Flag(parser=_Parser(name="config", lock_config=False),
                 serializer=flags.ArgumentSerializer(), name="config", default=spec,
                 help_string=help_text, flag_values=flag_values, accept_new_attributes=False,
                 sys_argv=None if argv is None else list(argv))
    return flags.DEFINE_flag(flag, flag_values)


def import_user_modules(cfg, argv: Sequence[str] = (), name: str = "config") -> list[str]:
    """Import the modules named by the config field `modules` (and by `--config.modules=...` in
    `argv`, before the overrides are applied) and the `fourm.modalities` entry points: users' own
    fields and modalities are registered before any key, data or model refers to them."""
    mods = cfg.get("modules", ()) if isinstance(cfg, ml_collections.ConfigDict) else ()
    specs = [mods] if isinstance(mods, str) else list(mods or ())
    argv = list(argv)
    for i, a in enumerate(argv):
        given = a.split("=", 1)[1] if a.startswith(f"--{name}.modules=") else (
            argv[i + 1] if a == f"--{name}.modules" and i + 1 < len(argv) else None)
        if given is not None:
            value = _literal(given)
            specs += [value] if isinstance(value, str) else list(value)
    return registry.load_modules(specs)


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
