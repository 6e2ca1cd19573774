"""A pair's daemon whose workers are rogue (tests/helpers/rogue_worker.py),
chosen through the pair's own spawn hook, run inside the real driver domain:

    python pair_with_rogue.py MODE PAIR_CONFIG_JSON READY_FD

Otherwise exactly the daemon `drb up` starts; `drb down` stops it.
"""

import os
import sys  # noqa: F401

from drb_uring.domains import daemon, state
from drb_uring.domains.config import PairConfig

ROGUE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rogue_worker.py")


class RoguePair(daemon.Pair):
    mode = ""

    def worker_argv(self, spec):
        # Inside the driver domain: the rogue's own source, as a -c program.
        with open(ROGUE) as f:
            return ["python3", "-c", f.read(), self.mode, spec.to_json()]


def main() -> int:
    RoguePair.mode = sys.argv[1]
    cfg = PairConfig.from_json(sys.argv[2])
    state.make_state_dir(cfg.name)
    state.record_daemon(cfg.name, os.getpid())
    daemon.Pair = RoguePair
    return daemon.run(cfg, int(sys.argv[3]))


if __name__ == "__main__":
    sys.exit(main())
