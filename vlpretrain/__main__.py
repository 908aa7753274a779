"""`python -m vlpretrain` runs the command-line interface."""

from vlpretrain.cli import main

raise SystemExit(main())
