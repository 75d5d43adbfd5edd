"""A dataclass as a command line, and user errors as one line.

Each field of the dataclass is a flag; its metadata holds the help (`help`), and optionally
`choices`, `nargs` / `const` (for an optional value), `min` (both checked by `check_values`) and
`default_help` (how --help shows the default). The element type of a flag comes from the
annotation (`int`, `float`, `list[float]`, `str | None`...). Presets are named sets of values
(the demo's) applied under the flags given, so `Config(**presets["demo"])` is `--demo`.
"""

import argparse
import dataclasses
import sys
import types
import typing


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a row): shown as one line, no traceback."""


def flag(default, help, **metadata):
    """A dataclass field with its help (and choices, nargs...) for the command line."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default),
                                 metadata=dict(help=help, **metadata))
    return dataclasses.field(default=default, metadata=dict(help=help, **metadata))


def check_values(config):
    """The `min` and `choices` of the fields' metadata, for a config made without the parser."""
    for f in dataclasses.fields(config):
        value, low, choices = (getattr(config, f.name), f.metadata.get("min"),
                               f.metadata.get("choices"))
        if low is not None and value < low:
            raise UserError(f"--{f.name} must be at least {low}, got {value}")
        if choices is not None and value not in choices:
            raise UserError(f"--{f.name} must be one of {list(choices)}, got {value!r}")


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
    """An argparse parser with one flag per field of `cls`. Flags not given are left out of the
    namespace, so the dataclass defaults (or a preset's) apply."""
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, values in (presets or {}).items():
        shown = " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                         for k, v in values.items())
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
    """Call `main(argv)`; a UserError ends the program with one line `error: ...`, status 2;
    Ctrl-C with status 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, quietly
        print("stopped", file=sys.stderr)
        sys.exit(130)
