"""One module per ``diverify`` subcommand; see :mod:`diverify.cli`."""
