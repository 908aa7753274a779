"""`python -m vlpretrain` runs the command-line interface.

A Ctrl-C while the command's libraries load (importing torch takes seconds) ends it with one
line and exit code 130, as one anywhere else outside the training steps does (cli.main)."""

import sys

try:
    from vlpretrain.cli import main
except KeyboardInterrupt:
    sys.stderr.write("vlpretrain: interrupted (Ctrl-C) while starting; nothing saved\n")
    raise SystemExit(130) from None  # 128 + SIGINT, as cli.INTERRUPTED_EXIT

raise SystemExit(main())
