"""`python -m vlpretrain` runs the command-line interface.

The command line module itself is light (a command imports torch and the rest when it runs,
inside cli.main, which turns a Ctrl-C there into one line and exit code 130). A Ctrl-C while
the command line module loads ends the same way here."""

import sys

try:
    from vlpretrain.cli import main
except KeyboardInterrupt:
    sys.stderr.write("vlpretrain: interrupted (Ctrl-C) while starting; nothing saved\n")
    raise SystemExit(130) from None  # 128 + SIGINT, as cli.INTERRUPTED_EXIT

raise SystemExit(main())
