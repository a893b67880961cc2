"""The README's job spec reference is the one generated from JobSpec's JSON schema today."""

from __future__ import annotations

from scripts.spec_reference import END, README, START, render


def test_readme_spec_reference_is_current() -> None:
    """Fails when normcore/spec.py changed without `python scripts/spec_reference.py --write`."""
    section = README.read_text().split(START, 1)[1].split(END, 1)[0]
    assert section.strip() == render().strip(), "run: python scripts/spec_reference.py --write"


def test_reference_lists_every_field_with_its_limits() -> None:
    """Every field of every spec section has a row, and bounds are rendered from the schema."""
    from normcore.spec import JobSpec

    text = render()
    for name, field in JobSpec.model_fields.items():
        assert f"| `{name}` |" in text, name
        sub = getattr(field.annotation, "model_fields", {})
        for sub_name in sub:
            assert f"| `{sub_name}` |" in text, f"{name}.{sub_name}"
    assert "| `lr` | number | 0.1 | > 0.0, <= 10.0 |" in text
