"""Nothing in the package assumes Fashion-MNIST outside the code that reads its default source:
its class names and its 28-pixel size appear, as code, only in the settings that define the
default dataset and in the IDX reader."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

from pipeline.config import FASHION_MNIST_CLASSES

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
#: Where the default dataset is defined (its class names, its shape) and read (the IDX format).
ALLOWED = {PACKAGE / "config" / "settings.py", PACKAGE / "data" / "idx.py"}


def code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    """The file's tokens other than comments and docstrings (a string alone on its line)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    kept = []
    for index, token in enumerate(tokens):
        before = tokens[index - 1].type if index else tokenize.NEWLINE
        docstring = token.type == tokenize.STRING and before in (tokenize.NEWLINE, tokenize.INDENT, tokenize.NL)
        if token.type != tokenize.COMMENT and not docstring:
            kept.append(token)
    return kept


def offenders(match) -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in ALLOWED:
            continue
        found += [f"{path.relative_to(PACKAGE.parent)}:{t.start[0]}: {t.string}" for t in code_tokens(path) if match(t)]
    return found


def test_no_fashion_mnist_class_name_in_the_code():
    names = set(FASHION_MNIST_CLASSES)

    def is_class_name(token: tokenize.TokenInfo) -> bool:
        if token.type != tokenize.STRING:
            return False
        text = token.string.strip("\"'rbfu")
        return text in names or any(n in text for n in ("T-shirt/top", "Ankle boot"))

    assert offenders(is_class_name) == []


def test_no_28_as_an_image_size_in_the_code():
    assert offenders(lambda t: t.type == tokenize.NUMBER and t.string == "28") == []


def test_the_check_itself_finds_a_planted_size_and_name(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text('"""Docstring with 28 and Sneaker."""\nSIZE = (28, 28)  # 28\nNAME = "Sneaker"\n')
    tokens = code_tokens(planted)
    assert [t.string for t in tokens if t.type == tokenize.NUMBER] == ["28", "28"]
    assert [t.string for t in tokens if t.type == tokenize.STRING] == ['"Sneaker"']
