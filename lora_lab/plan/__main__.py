"""`python -m lora_lab.plan [overrides]`: runs lora_lab.plan.cli.main and exits with its code."""

import sys

from lora_lab.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
