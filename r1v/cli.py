"""A dataclass as a command line, and user errors as one line.

Each field of the dataclass is a flag; its metadata holds the help (`help`), and optionally
`choices`, `nargs` / `const` (for an optional value), the bounds `min`, `above`, `max`, `below`
(checked by `check_values`, with every float's finiteness) and
`default_help` (how --help shows the default). The element type of a flag comes from the
annotation (`int`, `float`, `list[float]`, `str | None`...). Presets are named sets of values
(the demo's) applied under the flags given, so `Config(**presets["demo"])` is `--demo`.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import math
import operator
import os
import sys
import traceback
import types
import typing
from pathlib import Path


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a row): shown as one line, no traceback."""


@contextlib.contextmanager
def user_error(what, *kinds, hint=""):
    """What a library raises (`kinds`) about a user's input, as one line: `what (error)hint`."""
    try:
        yield
    except kinds as e:
        raise UserError(f"{what} ({e}){hint}") from e


def flag(default, help, **metadata):
    """A dataclass field with its help (and choices, nargs...) for the command line."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata=dict(help=help, **metadata))
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


BOUNDS = {"min": (operator.ge, "at least"), "above": (operator.gt, "above"),
          "max": (operator.le, "at most"), "below": (operator.lt, "below")}


def check_values(config):
    """Every field's value against its metadata, also for a config made without the parser:
    numbers finite and within the bounds `min`, `above`, `max`, `below`; one of `choices`. The
    error says why, with the flag's help."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        for v in value if isinstance(value, list) else [value]:
            bounds = [f"{word} {meta[k]}" for k, (ok, word) in BOUNDS.items()
                      if k in meta and v is not None and not ok(v, meta[k])]
            if isinstance(v, float) and not math.isfinite(v):
                bounds = ["a finite number"]
            if "choices" in meta and v not in meta["choices"]:
                bounds = [f"one of {list(meta['choices'])}"]
            if bounds:
                raise UserError(f"--{f.name} must be {' and '.join(bounds)}, got {v!r} "
                                f"({meta['help']})")


def _unwrap(annotation):
    """(element type, is_list) of `int`, `str | None`, `list[float]`, `list[str] | None`..."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser(cls, description, presets=None):
    """An argparse parser with one flag per field of `cls`, each given in full. Flags not given
    are left out of the namespace, so the dataclass defaults (or a preset's) apply."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)  # --max_step is a typo, not --max_steps
    for name, values in (presets or {}).items():
        shown = " ".join(f"--{'' if v else 'no-'}{k}" if isinstance(v, bool) else
                         f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in values.items())  # as they would be typed
        parser.add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS,
                            help=f"preset, the flags you give win: {shown}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, is_list = _unwrap(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = f.metadata.get("default_help", default)
        kwargs = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {shown})")
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, choices=f.metadata.get("choices"),
                          nargs=f.metadata.get("nargs", "+" if is_list else None))
            if "const" in f.metadata:
                kwargs["const"] = f.metadata["const"]
        parser.add_argument(f"--{f.name}", **{k: v for k, v in kwargs.items() if v is not None})
    return parser


def parse(cls, argv, description, presets=None):
    """The command line as an instance of `cls`: preset values first, the flags given on top."""
    given = vars(build_parser(cls, description, presets).parse_args(argv))
    values = {}
    for name, preset in (presets or {}).items():
        if given.pop(name, False):
            values.update(preset)
    return cls(**{**values, **given})


def run(main, argv=None):
    """Call `main(argv)`; a UserError ends the program with one line `error: ...`, status 2
    (under a launcher, printed by the first process only: every process finds the same one);
    Ctrl-C with status 130."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            lines = str(e).splitlines()  # a library's message may hold line breaks
            print(f"error: {' '.join(line.strip() for line in lines)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, quietly
        print("stopped", file=sys.stderr)
        sys.exit(130)


def import_function(spec, flag):
    """`path/to/file.py:function` of a flag (a user's reward) -> (name, function); where the
    file breaks is said in one line, not our traceback."""
    path, _, name = spec.rpartition(":")
    if not Path(path).is_file():
        raise UserError(f"{flag} {spec!r}: file {path!r} does not exist")
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:  # its helpers beside it import, as if run as a script; last,
        sys.path.append(folder)  # so that a helper named like a library does not hide it
    # Registered (dataclasses and pickle look a module up), under a name of its own: a file named
    # random.py or rewards.py must not replace those modules, nor a.py another folder's a.py.
    module_name = f"{Path(path).stem}_{hashlib.sha1(folder.encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None:  # Python imports only the suffixes it knows (.py, .so...)
        raise UserError(f"{flag} {spec!r}: {path!r} is not a Python file (path/to/file.py)")
    module = sys.modules[module_name] = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # sys.exit() there would end the command with no word
        del sys.modules[module_name]
        raise UserError(f"{flag} {spec!r}: {locate_failure(e, path)}: "
                        f"{type(e).__name__}: {e}") from e
    func = getattr(module, name, None)
    if not callable(func):
        raise UserError(f"{flag} {spec!r}: {path!r} has no function {name!r}")
    return name, func


def locate_failure(error, path):
    """`file:line` where importing `path` broke: a syntax error's own (maybe a helper's), else
    the last line of `path` the traceback passes through (not the library's line that raised)."""
    if isinstance(error, SyntaxError) and Path(error.filename or "").is_file():  # not ast.parse's
        file, line = error.filename, error.lineno
    else:
        frames = traceback.extract_tb(error.__traceback__)
        mine = [f for f in frames if Path(f.filename).resolve() == Path(path).resolve()]
        file, line = (mine or frames)[-1].filename, (mine or frames)[-1].lineno
    return f"{path if Path(file).resolve() == Path(path).resolve() else file}:{line}"
