"""Command-line entry points, one module per command, and the runner they share.

A command module has a docstring (its `--help` text), `define_flags(fv, argv)` (its own flags, on a
fresh absl FlagValues, so commands can be called in-process, one after another, as the tests do)
and `run(args, F) -> exit status` (parsed flags in `F`; library calls only). Its console entry is
`main = entry(__name__)`; `main(["fourm-x", "--flag", ...])` runs it in-process and returns the
exit status, where the console script exits with it.

The runner gives every command the same behaviour:
  * `--help` / `-h` prints the docstring, the command's flags with defaults and its config fields,
    and exits 0;
  * bad input (a flag, file or value) is one line `fourm-x: error: ...` on stderr and exit status 2,
    not a traceback; the command's own checks run before any data is read or device touched;
  * quiet by default: library INFO logs (orbax, absl, jax) are hidden, `-v` / `--verbosity=N`
    shows them; on a machine without TPU/GPU JAX runs on CPU only (no libtpu probing noise);
  * JAX's persistent compilation cache in a per-user folder (fourm.runtime), `--compilation_cache`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Callable, Sequence

from absl import app, flags

from fourm import runtime

USAGE_EXIT = 2  # bad input: flag, file, value or config
HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
NOISY_LOGGERS = ("absl", "orbax", "jax", "tensorboardX", "grain", "etils", "tensorflow", "tensorstore")
# Exceptions that mean "the user gave something wrong": one line, no traceback. The project's
# input errors (ConfigError, FolderError, CheckpointError, GenerationInputError, ...) are
# ValueErrors whose messages name the flag, file or field.
BAD_INPUT = (app.UsageError, flags.Error, ValueError, KeyError, OSError)


class CommandError(ValueError):
    """A bad command line detected by a command itself (message names the flag and what it expects)."""


def define_common_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_integer("verbosity", -1, "log level: -1 warnings only (default), 0 = INFO logs of "
                         "the libraries (orbax, jax, ...), 1+ = debug; -v = --verbosity=0",
                         short_name="v", flag_values=fv)
    flags.DEFINE_string("compilation_cache", None, "JAX persistent compilation cache folder (default "
                        f"${runtime.CACHE_ENV} or {runtime.default_cache_dir()}; safe to delete); "
                        "'off' disables it", flag_values=fv)


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """`--long-flag` -> `--long_flag`, bare `-v` -> `--verbosity=0`, `@` in config keys quoted."""
    from fourm.config import override_args

    out = [argv[0]]
    for a in argv[1:]:
        if a == "-v":
            a = "--verbosity=0"
        elif a.startswith("--") and not a.startswith("--config"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return override_args(out)


def _prescan(argv: Sequence[str], name: str) -> str | None:
    """The value of `--name=V` / `--name V` before flags are parsed (set-up that precedes jax)."""
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def setup_logging(verbosity: int) -> None:
    """Progress of fourm's own loggers at INFO; other libraries at WARNING unless -v."""
    from absl import logging as absl_logging

    absl_logging.use_absl_handler()
    absl_logging.set_verbosity(absl_logging.INFO if verbosity >= 0 else absl_logging.WARNING)
    level = logging.DEBUG if verbosity >= 1 else logging.INFO if verbosity >= 0 else logging.WARNING
    logging.getLogger().setLevel(min(level, logging.INFO))
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("fourm").setLevel(logging.DEBUG if verbosity >= 1 else logging.INFO)


def format_help(prog: str, doc: str, fv: flags.FlagValues) -> str:
    common = ["verbosity", "compilation_cache"]
    own = sorted({fv[n].name for n in fv if "." not in n and "[" not in n} - set(common))
    lines = [(doc or prog).strip(), "", f"flags of {prog}:"]
    for i, name in enumerate(own + common):
        if i == len(own):
            lines.append("common flags:")
        f = fv[name]
        short = f"-{f.short_name}, " if f.short_name else ""
        default = f.default_as_str if name == "config" else repr(f.default)
        lines.append(f"  {short}--{f.name}: {f.help} (default: {default})")
    if "config" in fv:
        from fourm.config import dotted_keys

        cfg = fv["config"].value
        lines += ["", "config fields (override with --config.KEY=VALUE):"]
        for key in dotted_keys(cfg):
            value = eval_path(cfg, key)
            if not hasattr(value, "items"):
                lines.append(f"  {key} = {value!r}")
    return "\n".join(lines)


def eval_path(cfg, dotted: str):
    node = cfg
    for p in dotted.split("."):
        node = node[p]
    return node


def program_name(module) -> str:
    """`fourm.cli.train_tokenizer` -> `fourm-train-tokenizer` (also when run with `python -m`)."""
    name = getattr(getattr(module, "__spec__", None), "name", None) or module.__name__
    return "fourm-" + name.rsplit(".", 1)[-1].replace("_", "-")


def run_command(module, argv: Sequence[str] | None = None,
                run_fn: Callable | None = None, prog: str | None = None) -> int:
    """Parse `argv` for `module`'s flags and call its `run` (or `run_fn`); returns the exit status."""
    argv = list(sys.argv if argv is None else argv)
    prog = prog or program_name(module)
    argv = normalize_argv([prog, *argv[1:]])
    wants_help = any(a in HELP_ARGS for a in argv[1:])

    # Before jax is imported (config files import fourm modules that import it).
    runtime.choose_platform()
    cache = _prescan(argv, "compilation_cache")
    if cache is None and runtime.CACHE_ENV not in os.environ:
        # A command whose figures include compile times (fourm-bench) keeps the cache off
        # unless asked: a warm cache would report loading as compiling.
        cache = getattr(module, "COMPILATION_CACHE_DEFAULT", None)
    runtime.enable_compilation_cache(cache)
    verbosity = _prescan(argv, "verbosity")
    try:
        setup_logging(int(verbosity) if verbosity is not None else -1)
    except ValueError:
        pass  # absl reports the bad --verbosity value below

    fv = flags.FlagValues()
    try:
        define_common_flags(fv)
        module.define_flags(fv, [prog] if wants_help else argv)
        if wants_help:
            print(format_help(prog, module.__doc__, fv))
            return 0
        args = fv(argv)
    except BAD_INPUT as e:  # flags, and config files that cannot be loaded
        return _error(prog, e)
    if not flags.FLAGS.is_parsed():  # absl.logging reads the global flags
        flags.FLAGS.mark_as_parsed()
    setup_logging(fv.verbosity)
    try:
        return int((run_fn or module.run)(args, fv) or 0)
    except BAD_INPUT as e:
        return _error(prog, e)


def _error(prog: str, e: BaseException) -> int:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
        msg = f"{e.filename}: {msg}"
    msg = " ".join(str(msg).split())  # one line
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return USAGE_EXIT


def entry(module_name: str, run_name: str = "run", prog: str | None = None) -> Callable:
    """The console-script `main` of a command module: exits with the command's status; given an
    argv (first item = program name) it runs in-process and returns the status instead."""

    def main(argv: Sequence[str] | None = None):
        module = importlib.import_module(module_name)
        rc = run_command(module, argv, getattr(module, run_name), prog)
        if argv is None:
            sys.exit(rc)
        return rc

    return main


def positive(name: str, value, allow_zero: bool = False):
    """`value` if it is > 0 (or >= 0), else CommandError naming the flag."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise CommandError(f"{name}: got {value}, expected a "
                           f"{'non-negative' if allow_zero else 'positive'} integer")
    return value
