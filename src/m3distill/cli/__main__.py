"""``python -m m3distill.cli``: the same as the ``m3distill`` command."""

from m3distill.cli import main

raise SystemExit(main())
