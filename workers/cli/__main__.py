"""`python -m moeserve.workers.cli`: the `moeserve` command."""

import sys

from moeserve.workers.cli.main import main

sys.exit(main())
