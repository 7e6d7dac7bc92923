from pipelines.docs import README, reference, updated_readme


def test_readme_cli_reference_is_in_sync_with_the_parser():
    text = README.read_text()
    assert updated_readme(text) == text, "README CLI reference is stale: python -m pipelines.docs"


def test_reference_lists_every_subcommand():
    ref = reference()
    for name in ("tile", "train", "evaluate", "predict", "run"):
        assert f"### `geodnn {name}`" in ref
