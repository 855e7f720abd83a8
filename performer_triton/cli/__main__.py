"""`python -m performer_triton.cli`, the same as `python -m performer_triton`."""
import sys

from . import main

sys.exit(main())
