import sys

from drb_uring.tools.cli import main

sys.exit(main())
