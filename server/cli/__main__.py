"""``python -m server.cli ...``: the ``fleet`` command (how tests and the demo start daemons)."""

from server.cli import main

if __name__ == "__main__":
    main()
