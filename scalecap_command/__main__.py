"""`python -m scalecap_command ...` runs the `scalecap` command (what the console script runs)."""

import sys

from scalecap_command import main

sys.exit(main())
