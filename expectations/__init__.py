"""The Great Expectations suites (JSON, one per file), shipped inside the package as
``pipeline.suites`` (see ``pyproject.toml``) so that an installed pipeline finds them."""
