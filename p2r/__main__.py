"""``python -m p2r``: the LightningCLI entry point (see p2r.cli)."""

from p2r.cli import main

if __name__ == "__main__":
    main()
