"""`python -m vqfunc.bench`."""

from vqfunc.bench._cli import main

raise SystemExit(main())
