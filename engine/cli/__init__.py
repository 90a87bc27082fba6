"""`dglm` command line: `main` builds the top-level parser and dispatches; one module per command
group (`generate` with `info`, `data`, `train`, `bundle`, `export`, `probe`, `eval`) registers its
own sub-parser with `add_parser(sub)` and runs its commands; `common` holds progress bars and
argument types they share. The CLI owns output, progress bars and exit codes.

The command modules import what a command needs (the engine, training, evaluation, export,
transformers, tqdm) inside the command function, not at the top: that keeps `dglm --help` and a
usage error from loading them. That is the only reason for those imports.
"""
