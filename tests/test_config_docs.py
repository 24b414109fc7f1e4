"""docs/configuration.md shows the settings table generated from the code."""

from pathlib import Path

from z4j.config import reference_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_page_has_the_generated_table() -> None:
    text = DOC.read_text()
    start = text.index("<!-- generated: z4j config --reference -->\n") + len(
        "<!-- generated: z4j config --reference -->\n"
    )
    end = text.index("<!-- end generated -->")
    assert text[start:end] == reference_markdown(), (
        "docs/configuration.md is out of date: paste the output of `z4j config --reference`"
    )
