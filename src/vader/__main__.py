"""`python -m vader` and `accelerate launch -m vader ...`."""

from vader.cli import main

raise SystemExit(main())
