"""The README and the exported schemas stay true to the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from consumer.cli import export_schemas
from consumer.config import Settings
from consumer.metrics import Metrics

ROOT = Path(__file__).parent.parent


def test_readme_documents_every_setting_and_nothing_else() -> None:
    """The README's configuration table lists exactly the variables the settings model reads."""
    readme = (ROOT / "README.md").read_text()
    table = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, flags=re.MULTILINE))
    assert table == {name.upper() for name in Settings.model_fields}


def test_exported_schemas_are_current(tmp_path: Path) -> None:
    """docs/schemas holds what the event models export now."""
    for path in export_schemas(tmp_path):
        committed = ROOT / "docs" / "schemas" / path.name
        assert json.loads(committed.read_text()) == json.loads(path.read_text()), path.name


def test_readme_lists_every_metric() -> None:
    """The README's metric table names exactly the metrics the service registers."""
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(evaljoin_[a-z_]+)` \|", readme, flags=re.MULTILINE))
    registered = {family.name + ("_total" if family.type == "counter" else "")
                  for family in Metrics().registry.collect()}
    assert listed == registered
