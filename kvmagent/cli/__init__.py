"""The command line: the entry and its short ways (main), argparse (parser)
and one module per family of commands."""
