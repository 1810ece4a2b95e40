"""`python -m bmcc.synthetic`: see `bmcc.synthetic.cli`."""

from bmcc.synthetic.cli import main

raise SystemExit(main())
