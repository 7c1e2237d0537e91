"""``python -m diffcache`` runs the same CLI as the ``diffcache`` command."""

from .cli import main

raise SystemExit(main())
