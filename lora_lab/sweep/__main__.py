"""`python -m lora_lab.sweep ...`: the entry point; the command itself is lora_lab.sweep.cli."""

import sys

from lora_lab.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
