"""`python -m kira`: the `kira` command (see `kira._cli`)."""

from kira._cli import main

if __name__ == "__main__":
    raise SystemExit(main())
