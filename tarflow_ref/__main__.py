"""`python -m tarflow_ref ...` runs the command line (cli/)."""
from .cli import main

main()
