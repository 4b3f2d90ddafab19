"""``python -m clusterformers`` (also what ``torchrun -m clusterformers`` runs)."""

from clusterformers.cli import main

raise SystemExit(main())
