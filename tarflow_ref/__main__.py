"""`python -m tarflow_ref ...` runs the command line (cli.py)."""
from .cli import main

main()
