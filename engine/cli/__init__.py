"""`dglm` command line: one module per command group (generate, data, train, bundle, export, eval)."""
