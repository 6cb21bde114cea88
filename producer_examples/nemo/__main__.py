"""``python -m producer_examples.nemo``: see ``cli.py``."""

from producer_examples.nemo.cli import main

raise SystemExit(main())
