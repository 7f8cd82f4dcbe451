"""`python -m diffstyler.cli`: the `diffstyler` command (torchrun and DDP relaunch it this way)."""

from diffstyler.cli import main

main()
