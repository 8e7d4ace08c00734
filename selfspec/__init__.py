"""The top of the tree: the `selfspec` command (cli.py) and `selfspec up` (up.py), which join the
halves. Nothing below imports this package."""
