"""A broker whose workers are rogue (tests/helpers/rogue_worker.py), chosen
through the broker's own spawn hook:

    python broker_with_rogue.py MODE[@BASE] BROKER_SPEC_JSON

With @BASE, only the workers whose newest channel lies at or past device
offset BASE are rogue (one user domain among several); the others are
real. Otherwise exactly `python -m drb_uring.channel.broker BROKER_SPEC_JSON`.
"""

import os
import subprocess
import sys

from drb_uring import procs
from drb_uring.channel import broker
from drb_uring.channel.broker import BrokerSpec

ROGUE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rogue_worker.py")


def main() -> int:
    mode, _, base = sys.argv[1].partition("@")

    def spawn(spec, fds):
        if base and spec.channels[-1]["extent_base"] < int(base):
            return broker.spawn_plain(spec, fds)
        proc = subprocess.Popen([sys.executable, ROGUE, mode, spec.to_json()], pass_fds=fds,
                                env=procs.module_env())
        return proc, proc.pid

    return broker.serve(BrokerSpec.from_json(sys.argv[2]), spawn)


if __name__ == "__main__":
    sys.exit(main())
