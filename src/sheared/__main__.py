"""`python -m sheared ...` (also what torchrun launches: `torchrun ... -m sheared prune ...`)."""

import sys

from sheared.cli import main

sys.exit(main())
