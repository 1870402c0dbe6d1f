"""The five stages. Each module has a pure `run(params, paths, ...) -> summary` and a thin `main`."""
