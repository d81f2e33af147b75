"""``python -m loradex ...``: the same as the ``loradex`` command."""

from loradex.cli import main

if __name__ == "__main__":
    main()
