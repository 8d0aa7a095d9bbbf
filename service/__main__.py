"""``python -m service``: the same as the ``mnist-serve`` console script."""

from service.server import main

raise SystemExit(main())
