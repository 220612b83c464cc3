"""`python -m dist_secvec ...` (the form the deepspeed launcher's --module uses)."""

import sys

from dist_secvec.cli import main

sys.exit(main())
