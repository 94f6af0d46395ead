"""``python -m nashray.cli``: the ``nashray`` command (defined in :mod:`nashray.cluster.cli`)."""

from nashray.cluster.cli import main

if __name__ == "__main__":
    main()
