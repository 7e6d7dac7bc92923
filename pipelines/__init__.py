"""pipelines: the jobs a user runs (tile, train, evaluate, predict, run) and the CLI."""
