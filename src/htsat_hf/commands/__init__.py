"""The installed command line: `htsat-hf <command> ...` (also `python -m htsat_hf <command> ...`).

One module per command, each with `build_parser()` and `main(argv) -> int`, thin over the package: the argument
handling lives here, the job in the package module it belongs to (`annotation/`, `live/`, `training/`, `weights/`,
`deployment/`, `metrics/`, `benchmarks/`, `demo/`). `cli.main` dispatches to them; see `cli.COMMANDS`.
"""
