"""Entry point: ``python -m mob_kernels.bench [--preset demo] ...``."""

from .cli import main

raise SystemExit(main())
