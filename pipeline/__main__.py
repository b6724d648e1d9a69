"""``python -m pipeline``: the ``pipeline`` command."""

from pipeline.entrypoints.cli import main

raise SystemExit(main())
