"""pipelines: the jobs a user runs (tile, train, evaluate, predict, run) and the CLI.

From Python: `pipelines.tile.build_store`, `pipelines.config.load_config`,
`pipelines.train.train`, `pipelines.evaluate.evaluate_scene`, `pipelines.predict.predict_scene`
(the README's "From Python" shows them together). Bad input raises `geodnn.GeodnnError`,
`tiles.TilesError` or `pipelines.errors.PipelineError`."""
