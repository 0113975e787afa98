"""The command line's view of the configuration: one flag and one variable per config field.

    config = load_config(["--n-ctx", "8192"], os.environ)     # a `Config` (config.py)
    parser = argparse.ArgumentParser(); add_arguments(parser)

Every field of the groups in `config.py` whose option says `cli` is an option here: its name
gives the flag (`n_ctx` -> `--n-ctx`) and the environment variable (`CHATSTREAM_N_CTX`), its
type the conversion, its option the help text, the range and the choices. A flag wins over
its variable; an empty variable counts as unset; on the command line 0 means "no limit" for
the fields that say so (`zero_is_none`). Nothing here is a second source of defaults: the
parser's defaults are the config's (or a field's `cli_default`, where the command line's
own differs, as the number of concurrent generations does).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from dataclasses import Field
from typing import Any

from .config import ACCESS, DEFAULTS, GROUPS, Config, Option, all_options, kind

__all__ = ["ENV_HELP", "ENV_PREFIX", "add_arguments", "env_name", "flag_name", "load_config"]

log = logging.getLogger(__name__)

ENV_PREFIX = "CHATSTREAM_"
ENV_HELP = (f"Every option can also be set by its environment variable ({ENV_PREFIX}..., shown "
            "in brackets); a flag wins over its variable, and an empty variable counts as "
            "unset. Switches take 1/0, true/false, yes/no or on/off.")
# Accepted for old scripts, with no effect: the key guards the chat routes by default now.
NO_EFFECT = "api_key_guards_chat"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def flag_name(name: str) -> str:
    """`n_ctx` -> `--n-ctx`."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """`n_ctx` -> `CHATSTREAM_N_CTX`."""
    return ENV_PREFIX + name.upper()


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str],
                parser: argparse.ArgumentParser | None = None) -> Config:
    """The configuration a command line and an environment give; a flag wins over its variable.

    A bad flag exits with argparse's usage message (code 2); a bad variable or two values
    that do not fit together raise ValueError naming them.
    """
    if parser is None:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
    # Every dest starts unset, so that argparse leaves alone what no flag gave (its
    # defaults would hide the variables).
    given = parser.parse_args(argv, argparse.Namespace(
        **{f.name: _UNSET for _, f, opt in _cli_options()}, **{NO_EFFECT: _UNSET}))
    if getattr(given, NO_EFFECT) is not _UNSET or environ.get(env_name(NO_EFFECT)):
        log.warning("%s does nothing: the API key guards the chat routes by default; "
                    "--api-key-open-chat leaves them open", flag_name(NO_EFFECT))
    groups: dict[str, dict[str, Any]] = {name: {} for name, _ in GROUPS}
    for group, f, opt in _cli_options():
        value = getattr(given, f.name)
        if value is _UNSET:
            value = _from_env(f, opt, environ, group)
        if value is _UNSET and opt.cli_default is not None:
            value = opt.cli_default
        if value is not _UNSET:
            if opt.zero_is_none and value == 0:
                value = None
            groups[group][f.name] = value
    try:
        return Config(**{name: cls(**groups[name]) for name, cls in GROUPS})
    except ValueError as error:
        raise ValueError(_named(str(error))) from None


def _named(message: str) -> str:
    """"n_ctx: must be ..." -> "--n-ctx: must be ..."; cross-field messages name flags too."""
    name, sep, rest = message.partition(": ")
    if sep and name in {f.name for _, f, _ in all_options()}:
        return f"{flag_name(name)}: {rest}"
    for _, f, _ in all_options():
        message = message.replace(f"{f.name} (", f"{flag_name(f.name)} (")
    return message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per config field, in argument groups, each help naming its variable.

    The parser's defaults are the config's (not the environment, so --help never shows a
    variable's value); `load_config` fills in the variables.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for group, f, opt in _cli_options():
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        target = groups[opt.group]
        cls = dict(GROUPS)[group]
        found = kind(cls, f)
        help_text = f"{opt.help} (default: {_shown_default(f, opt)}) [env: {env_name(f.name)}"
        help_text += ", comma-separated]" if found is tuple else "]"
        help_text = help_text.replace("%", "%%")   # argparse formats help with %
        default = opt.cli_default if opt.cli_default is not None else DEFAULTS.value(f.name)
        if found is bool:
            target.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif found is tuple:
            target.add_argument(flag_name(f.name), action=_Repeat, default=default,
                                type=_argparse_type(opt, str), metavar=opt.metavar,
                                help=help_text)
        else:
            metavar = opt.metavar or ("N" if found is int else "X" if found is float else "TEXT")
            target.add_argument(flag_name(f.name), type=_argparse_type(opt, found),
                                default=default, metavar=None if opt.choices else metavar,
                                choices=opt.choices or None, help=help_text)
    groups[ACCESS].add_argument(
        flag_name(NO_EFFECT), action="store_true", default=False,
        help="kept for old scripts: does nothing (the key guards the chat routes by "
        f"default; --api-key-open-chat opens them) [env: {env_name(NO_EFFECT)}]")


def _cli_options() -> list[tuple[str, Field[Any], Option]]:
    return [(group, f, opt) for group, f, opt in all_options() if opt.cli]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()


class _Repeat(argparse.Action):
    """A repeatable option, collected in a tuple (the field's type; "append" makes a list)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        before = getattr(namespace, self.dest, ())
        setattr(namespace, self.dest, (*(before if isinstance(before, tuple) else ()), values))


def _convert(opt: Option, found: type, raw: str) -> Any:
    """The value of text from a flag or a variable, checked; ValueError says what is wrong."""
    got = "" if opt.secret else f", got {raw!r}"
    if found is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(f"must be one of {'/'.join(_TRUE)} or {'/'.join(_FALSE)}{got}")
    value: Any
    if found is int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"must be an integer{got}") from None
    elif found is float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"must be a number{got}") from None
    elif opt.choices:
        # Choices match whatever the case (info, INFO); the value is the choice's spelling.
        value = next((c for c in opt.choices if c.lower() == raw.lower()), raw)
    else:
        value = raw
    if not (opt.zero_is_none and value == 0):
        opt.check(value)
    return value


def _argparse_type(opt: Option, found: type) -> Any:
    def convert(raw: str) -> Any:
        try:
            return _convert(opt, found, raw)
        except ValueError as error:   # argparse prefixes "argument --flag: "
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = found.__name__
    return convert


def _from_env(f: Field[Any], opt: Option, environ: Mapping[str, str], group: str) -> Any:
    name = env_name(f.name)
    raw = environ.get(name, "")
    if not raw:
        return _UNSET
    found = kind(dict(GROUPS)[group], f)
    try:
        if found is tuple:
            return tuple(_convert(opt, str, item.strip()) for item in raw.split(",")
                         if item.strip())
        return _convert(opt, found, raw)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _shown_default(f: Field[Any], opt: Option) -> str:
    if opt.shown_default is not None:
        return opt.shown_default
    value = opt.cli_default if opt.cli_default is not None else DEFAULTS.value(f.name)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if value in (None, ()):
        return "none"
    return str(value)
