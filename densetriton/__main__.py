"""`python -m densetriton ...` (and `torchrun -m densetriton ...`) run the command line."""

from .cli import main

raise SystemExit(main())
