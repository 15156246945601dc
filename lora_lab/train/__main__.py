"""`python -m lora_lab.train [overrides]`: runs lora_lab.train.cli.main and exits with its code."""

import sys

from lora_lab.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
