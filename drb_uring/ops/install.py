"""`drb install-units` and `drb install-hook`: drb's systemd units and its
OCI hook configuration, put where systemd and podman look for them.

The units ship in the package (drb_uring/ops/units/) with @DRB@ where the
path of the drb that installs them goes. Files are written whole, then
renamed into place: a watcher (podman rereads hooks.d) never sees half of
one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from drb_uring.errors import DrbError

UNITS_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "units")
UNITS = ("drb-ebpfd.service", "drb@.service")
UNIT_DIR = "/etc/systemd/system"
CONFIG_DIR = "/etc/drb"
HOOKS_DIR = "/etc/containers/oci/hooks.d"
HOOK_FILE = "50-drb.json"
HOOK_TIMEOUT = 60          # seconds: a user domain more, with its extent wiped if needed
PAIR_ANNOTATION = "io.drb.pair"


class InstallError(DrbError):
    pass


def drb_path() -> str:
    """The drb command this very drb runs as."""
    here = os.path.join(os.path.dirname(sys.executable), "drb")
    found = here if os.access(here, os.X_OK) else shutil.which("drb")
    if not found:
        raise InstallError("cannot tell where the drb command is: run drb from its install")
    return os.path.abspath(found)


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def unit_text(name: str, drb: str) -> str:
    with open(os.path.join(UNITS_SRC, name)) as f:
        return f.read().replace("@DRB@", drb)


def install_units(unit_dir: str | None = None) -> list[str]:
    """The units, with this drb's path; returns what was written."""
    target = unit_dir or UNIT_DIR
    if not os.path.isdir(target):
        raise InstallError(f"{target} is not a directory")
    drb = drb_path()
    done = []
    for name in UNITS:
        path = os.path.join(target, name)
        write_atomic(path, unit_text(name, drb))
        done.append(path)
    if unit_dir is None:
        os.makedirs(CONFIG_DIR, mode=0o755, exist_ok=True)
        if os.path.isdir("/run/systemd/system"):         # systemd runs this host
            subprocess.run(["systemctl", "daemon-reload"], check=False)
    return done


def hook_config(drb: str) -> dict:
    """The hooks.d entry (containers' oci-hooks(5), schema 1.0.0): drb hook
    for every container with the io.drb.pair annotation, when it is created
    (before its process starts) and after it stopped."""
    return {
        "version": "1.0.0",
        "hook": {"path": drb, "args": ["drb", "hook"], "timeout": HOOK_TIMEOUT},
        "when": {"annotations": {"^" + PAIR_ANNOTATION.replace(".", r"\.") + "$": ".*"}},
        "stages": ["createRuntime", "poststop"],
    }


def ebpfd() -> int:
    """`drb ebpfd`: the host's eBPF service in the foreground, kept loaded."""
    from drb_uring.domains.state import require_root
    from drb_uring.enforce import service
    require_root()
    return service.main([service.ServiceSpec(foreground=True).to_json()])


def command(cmd: str, where: str | None) -> list[str]:
    """`drb install-units` and `drb install-hook`: what was done, a line each."""
    from drb_uring.domains.state import require_root
    require_root()
    if cmd == "install-hook":
        return [f"wrote {install_hook(where)}: podman run --annotation {PAIR_ANNOTATION}=NAME "
                "... makes a user domain of pair NAME"]
    out = [f"wrote {path}" for path in install_units(where)]
    if where is None:
        out.append("now: drb status NAME --config > /etc/drb/NAME.toml; "
                   "systemctl enable --now drb-ebpfd drb@NAME")
    return out


def install_hook(hooks_dir: str | None = None) -> str:
    target = hooks_dir or HOOKS_DIR
    if hooks_dir is None:
        os.makedirs(target, mode=0o755, exist_ok=True)
    elif not os.path.isdir(target):
        raise InstallError(f"{target} is not a directory")
    path = os.path.join(target, HOOK_FILE)
    write_atomic(path, json.dumps(hook_config(drb_path()), indent=2) + "\n")
    return path
