from pipelines.docs import README, reference, updated_readme


def test_readme_cli_reference_is_in_sync_with_the_parser():
    text = README.read_text()
    assert updated_readme(text) == text, "README CLI reference is stale: python -m pipelines.docs"


def test_reference_lists_every_subcommand():
    ref = reference()
    for name in ("tile", "train", "evaluate", "predict", "run"):
        assert f"### `geodnn {name}`" in ref


def test_an_installed_copy_without_the_readme_prints_the_reference(monkeypatch, tmp_path, capsys):
    import pipelines.docs

    monkeypatch.setattr(pipelines.docs, "README", tmp_path / "README.md")  # as in site-packages
    assert pipelines.docs.main() == 0
    assert capsys.readouterr().out.strip() == reference()
    assert not (tmp_path / "README.md").exists()
