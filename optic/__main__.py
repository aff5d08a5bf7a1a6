"""``python -m optic`` runs the command line."""

from .cli import main

raise SystemExit(main())
