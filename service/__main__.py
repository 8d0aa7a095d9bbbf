"""``python -m service``: the same as the ``mnist-serve`` console script."""

from service.main import main

raise SystemExit(main())
