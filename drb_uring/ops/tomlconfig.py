"""A pair's configuration as a TOML file: `drb up NAME --config FILE`, and
`drb status NAME --config`, which writes the same format.

A key is an option of `drb up` without its dashes (`size = "1g"`,
`o-direct = true`, `share = ["/srv/app:/app"]`); `name`, if there, must be
the pair's. The file becomes the options it stands for, put before those of
the command line (which therefore win), and `drb up`'s own parser checks
them: a file says nothing the command line could not.
"""

from __future__ import annotations

import argparse
import json
import tomllib

from drb_uring.domains.config import parse_size
from drb_uring.errors import DrbError

# PairConfig's fields that are options of `drb up`, in the order written.
FIELDS = ("backing", "size", "blockdev", "o_direct", "users", "extent", "max_users",
          "max_channels", "max_pinned", "domain_pids", "domain_memory", "driver_cpus",
          "deny", "share", "user_rootfs", "driver_rootfs", "attach_user", "attach_driver",
          "allow_host_userns", "restart", "no_monitor", "force", "disk", "disk_path", "fs",
          "fs_mount")
SIZES = {"size", "extent", "max_pinned", "domain_memory"}
NOT_IN_FILE = {"--help", "--config"}


class ConfigFileError(DrbError):
    pass


def up_options(up: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options of `drb up` a file may set, by key."""
    return {opt[2:]: a for a in up._actions for opt in a.option_strings
            if opt.startswith("--") and opt not in NOT_IN_FILE}


def _tokens(path: str, key: str, value, action: argparse.Action) -> list[str]:
    opt = f"--{key}"
    where = f"{path}: {key}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise ConfigFileError(f"{where}: true or false, not {value!r}")
        return [opt] if value else []
    values = value if isinstance(value, list) and isinstance(action, argparse._AppendAction) \
        else [value]
    if key == "deny" and isinstance(value, list):
        values = [",".join(value)] if all(isinstance(v, str) for v in value) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ConfigFileError(f"{where}: a string or an integer, not {v!r}")
        text = str(v)
        if key.replace("-", "_") in SIZES:
            try:
                parse_size(text)
            except DrbError as e:
                raise ConfigFileError(f"{where}: {e}") from None
        if action.type is not None:
            try:
                action.type(text)
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise ConfigFileError(f"{where}: {e}") from None
        out += [opt, text]
    return out


def file_argv(path: str, name: str, up: argparse.ArgumentParser) -> list[str]:
    """The options of `drb up` that file `path` stands for."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"--config {path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigFileError(f"--config {path}: not TOML: {e}") from None
    if "name" in data and data.pop("name") != name:
        raise ConfigFileError(f"{path}: it is the configuration of another pair "
                              f"(name = {json.dumps(str(data.get('name', '?')))}), not {name}")
    options = up_options(up)
    argv = []
    for key, value in data.items():
        if key not in options:
            raise ConfigFileError(f"{path}: {key!r} is no option of drb up (keys are its "
                                  "options without the dashes, e.g. size, o-direct, users)")
        argv += _tokens(path, key, value, options[key])
    return argv


def expand(argv: list[str], path: str, name: str, parser: argparse.ArgumentParser,
           up: argparse.ArgumentParser) -> argparse.Namespace:
    """`drb up ... --config FILE ...` parsed again as the file's options
    followed by the command line's (without --config)."""
    rest, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--config":
            skip = True
        elif not tok.startswith("--config="):
            rest.append(tok)
    at = rest.index("up") + 1
    return parser.parse_args(rest[:at] + file_argv(path, name, up) + rest[at:])


def size_text(n: int) -> str:
    for suffix, shift in (("t", 40), ("g", 30), ("m", 20), ("k", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    # A JSON string without \u escapes of astral characters is a TOML basic string.
    return json.dumps(str(v), ensure_ascii=False)


def of_pair(name: str | None) -> str:
    """`drb status NAME --config`: the running pair's configuration as a file."""
    from drb_uring.domains import state
    st = state.read_state(name) if name else None
    if st is None:
        raise ConfigFileError("drb status NAME --config: which pair? (one that is up)")
    if "config" not in st:
        raise ConfigFileError(f"pair {name!r} was brought up by a drb that kept no config")
    return to_toml(st["config"])


def to_toml(cfg: dict) -> str:
    """A pair's configuration (PairConfig as a dict) as the file `drb up
    --config` reads."""
    lines = [f"# drb up {cfg['name']} --config FILE brings this pair up again",
             f"name = {_value(cfg['name'])}"]
    for field in FIELDS:
        v = cfg.get(field)
        if v is None or (field == "size" and (cfg.get("backing") or cfg.get("blockdev"))):
            continue
        if field in SIZES:
            v = size_text(v)
        lines.append(f"{field.replace('_', '-')} = {_value(v)}")
    return "\n".join(lines) + "\n"
