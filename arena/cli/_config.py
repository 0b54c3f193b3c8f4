"""``--config FILE`` and the run record of the long commands.

`long_command` gives a command an eager ``--config FILE`` option: a TOML file whose keys are the command's options
(``image-size`` or ``image_size``; ``amp = false`` for ``--no-amp``; an array for a repeatable option or a
comma-separated list). The file becomes click's ``default_map``, so an option on the command line overrides it and
click converts, range-checks and calls back on both alike. Relative paths in the file are taken from the current
folder, as on the command line. Each run then writes its record and log (`arena.run_record`) into the folder that
the command names for its outputs.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (pyproject: tomli; python_version < "3.11")
    import tomli as tomllib

from arena.errors import ArenaError

RUNS_DIR = "runs"  # the records and logs of the runs that wrote a folder: <folder>/runs/
RUNS_SUFFIX = ".runs"  # ... and of those that wrote a file (the feature cache): <file>.runs/
CONFIG_META = "arena.config_file"  # ctx.meta key: the --config file of this invocation
_SOURCES = {ParameterSource.COMMANDLINE: "command line", ParameterSource.ENVIRONMENT: "environment",
            ParameterSource.DEFAULT_MAP: "config file", ParameterSource.DEFAULT: "default",
            ParameterSource.PROMPT: "prompt"}


def _options(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and p.name not in (None, "config", "help")]


def _long_name(option: click.Option) -> str:
    return next((o[2:] for o in option.opts if o.startswith("--")), option.name or "")


def _keys(command: click.Command) -> dict[str, click.Option]:
    """Every key a config file may use, dashes written as underscores: each long option name (``--no-amp``'s
    pair is ``amp``) and the parameter's own name (``--model`` stores ``kind``)."""
    keys = {}
    for option in _options(command):
        for name in [o[2:] for o in option.opts if o.startswith("--")] + [option.name]:
            keys[name.replace("-", "_")] = option
    return keys


def _scalar(option: click.Option, value: Any) -> Any:
    """``value`` when its TOML type fits the option (a whole number for an integer option, ...); a number or a list
    of them for a text option becomes text (``frames = [24, 32]`` is ``--frames 24,32``). Raises TypeError naming
    what the option takes."""
    kind = option.type
    if isinstance(kind, click.types.BoolParamType) or (option.is_flag and option.is_bool_flag):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(kind, click.types.IntParamType):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(kind, click.types.FloatParamType):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(kind, click.types.StringParamType) and not option.multiple:
        if isinstance(value, list) and value and all(isinstance(v, (int, str)) for v in value):
            value = ",".join(map(str, value))
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        ok, want = isinstance(value, str), "a string (or a list, for a comma-separated option)"
    else:  # Choice, Path, text in a repeatable option
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise TypeError(f"takes {want}, not {type(value).__name__} {value!r}")
    return value


def _toml_value(option: click.Option, value: Any) -> Any:
    if option.multiple:
        return [_scalar(option, v) for v in (value if isinstance(value, list) else [value])]
    return _scalar(option, value)


def _read_config(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    """The eager ``--config`` callback: check the file against the command's options and install it as click's
    ``default_map`` before any other option is processed."""
    if path is None:
        return
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except OSError as exc:
        raise click.BadParameter(f"{path}: cannot be read ({exc.strerror or exc}).", ctx, param) from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path}: not valid TOML ({exc}).", ctx, param) from None
    keys = _keys(ctx.command)
    allowed = ", ".join(sorted(_long_name(o) for o in _options(ctx.command)))
    values: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, raw in table.items():
        option = keys.get(key.replace("-", "_"))
        if option is None:
            raise click.BadParameter(f"{path}: unknown key {key!r} for `{ctx.command_path}`; allowed keys: "
                                     f"{allowed}.", ctx, param)
        where = f"{path}: key {key!r} (--{_long_name(option)})"
        if option.name in given:
            raise click.BadParameter(f"{where}: --{_long_name(option)} is already set by key "
                                     f"{given[option.name]!r}.", ctx, param)
        try:
            value = _toml_value(option, raw)
            option.process_value(ctx, value)  # click's own conversion, range and callback, here to name the key
        except TypeError as exc:
            raise click.BadParameter(f"{where} {exc}.", ctx, param) from None
        except click.BadParameter as exc:
            raise click.BadParameter(f"{where}: {exc.message}", ctx, param) from None
        values[option.name], given[option.name] = value, key
    ctx.default_map = {**(ctx.default_map or {}), **values}
    ctx.meta[CONFIG_META] = path


def config_option(f):
    """``--config FILE``: option values from a TOML file; the command line overrides them."""
    return click.option("--config", type=click.Path(dir_okay=False), default=None, metavar="FILE", is_eager=True,
                        expose_value=False, callback=_read_config,
                        help="TOML file of option values (keys: the long option names, e.g. image-size = 224, "
                             "amp = false, models = [\"a\", \"b\"]); options on the command line override it.")(f)


# --------------------------------------------------------------------------------------------------- the run record


def _main_process() -> bool:
    """False in the other processes of a torchrun job: rank 0 writes the record, as it writes the outputs."""
    return os.environ.get("RANK", "0") == "0"


def _exit_status(exc: BaseException) -> tuple[int, str | None]:
    if isinstance(exc, SystemExit):
        code = exc.code
        return (0, None) if code is None else (code, None) if isinstance(code, int) else (1, str(code))
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code, None
    if isinstance(exc, click.ClickException):
        return exc.exit_code, exc.format_message()
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, f"{type(exc).__name__}: {exc}"


def _missing_top(folder: Path) -> Path | None:
    """The outermost of ``folder`` and its parents that does not exist yet (None: ``folder`` exists)."""
    top = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        top = p
    return top


def _discard_if_only(top: Path, keep: set[str]) -> None:
    """Remove ``top`` -- the outputs' folder, which this run made -- when it holds nothing but the record and log: a
    run refused before any output leaves no folder behind (its error is on the console)."""
    if {os.path.abspath(p) for p in top.rglob("*") if not p.is_dir()} <= keep:
        shutil.rmtree(top, ignore_errors=True)


def _record(f: Callable, params: dict[str, Any], folder: str | os.PathLike) -> Any:
    """Run ``f(**params)`` with its record and log in ``folder``."""
    from arena.run_record import finish_record, new_run_files, resolved_config, run_log, write_record

    ctx = click.get_current_context()
    command = ctx.info_name or ctx.command.name or "command"
    options = {o.name: o for o in _options(ctx.command)}
    paths = {name: (os.path.abspath(v) if isinstance(v, str) else [os.path.abspath(x) for x in v])
             for name, v in params.items()
             if name in options and isinstance(options[name].type, click.Path) and v not in (None, ())}
    sources = {name: _SOURCES.get(ctx.get_parameter_source(name), "default") for name in params}
    record = resolved_config(command, options=params, sources=sources, paths=paths,
                             config_file=ctx.meta.get(CONFIG_META))
    created = _missing_top(Path(os.path.abspath(folder)).parent)  # the outputs' folder, made by this run
    files = new_run_files(folder, command)
    write_record(files.record, record)
    started, status, error = time.monotonic(), 0, None
    try:
        with run_log(files.log) as log:
            log.note(f"arena {command}: resolved configuration in {files.record}")
            try:
                return f(**params)
            except BaseException as exc:
                status, error = _exit_status(exc)
                if error is not None and not isinstance(exc, (ArenaError, click.ClickException, KeyboardInterrupt)):
                    error = traceback.format_exc().rstrip()
                raise
            finally:
                if error is not None:
                    log.note(f"error: {error}", logging.ERROR)
                log.note(f"finished: exit status {status} after {time.monotonic() - started:.1f} s")
                write_record(files.record, finish_record(record, started, status, error))
    finally:
        if status != 0 and created is not None:
            _discard_if_only(created, {os.path.abspath(files.record), os.path.abspath(files.log)})


def runs_in(option: str) -> Callable[[dict[str, Any]], Path]:
    """The records of a command that writes into the folder ``option`` names: ``<folder>/runs``."""
    return lambda params: Path(params[option]) / RUNS_DIR


def runs_beside(option: str) -> Callable[[dict[str, Any]], Path]:
    """The records of a command that writes the file ``option`` names: ``<file>.runs`` beside it."""
    return lambda params: Path(f"{params[option]}{RUNS_SUFFIX}")


def long_command(runs: Callable[[dict[str, Any]], str | os.PathLike | None]):
    """Give a command ``--config FILE`` and, for each run, a record and a log in the folder ``runs(params)``
    returns (None: no record; an `ArenaError` it raises is the command's, e.g. a fold the split lacks).

    Put it right under ``@main.command(...)``.
    """

    def decorate(f):
        @functools.wraps(f)
        def run(**params):
            folder = runs(params) if _main_process() else None
            return f(**params) if folder is None else _record(f, params, folder)

        return config_option(run)

    return decorate
