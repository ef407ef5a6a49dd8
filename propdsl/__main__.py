"""`python -m propdsl ...`: the same command line as `propdsl ...`."""

from propdsl.cli import main

main()
