"""``python -m fleet_api.cli``: the same as the ``fleet`` script (used by ``fleet up``)."""

from fleet_api.cli import main

main()
