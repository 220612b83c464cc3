"""`python -m dist_secvec.profile --memory-child SPEC`: one variant's job in a fresh process, for
its peak memory (peaks.memory_in_processes starts it; use `dist-secvec profile`)."""

import sys

from dist_secvec.profile.peaks import memory_child

if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
    sys.exit(memory_child(sys.argv[2]))
sys.exit("usage: python -m dist_secvec.profile --memory-child SPEC (internal; use `dist-secvec profile`)")
