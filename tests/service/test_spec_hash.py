"""The Idempotency-Key request hash survives upgrades that add spec fields with defaults."""

from __future__ import annotations

import json

from normcore.spec import JobSpec
from service.jobs import canonical_hash
from tests.harness import REPO

# canonical_hash of these specs as computed by the release before model.stem_padding and
# telemetry existed (commit 398da1e): a key stored then must still match after the upgrade.
BEFORE_NEW_FIELDS = {
    "lenet-digits": "932187d4f0c09874b396902c90cc6c395c9b4cfcca370ee3625897bfb1bc065e",
    "resnet20-gn": "90eb1ae5a4432d72e7b0f78e51541bc15fc764c9eccb424b58b43df52b37df2c",
}


def _specs() -> dict[str, dict]:
    return {
        "lenet-digits": json.loads((REPO / "examples/lenet-digits.json").read_text()),
        "resnet20-gn": {
            "model": {"arch": "resnet20", "norm": "gn:4"},
            "data": {"dataset": "synthetic"},
            "tags": ["a"],
        },
    }


def test_hash_of_a_spec_is_unchanged_by_fields_added_since() -> None:
    for name, raw in _specs().items():
        assert canonical_hash(JobSpec.model_validate(raw)) == BEFORE_NEW_FIELDS[name], name


def test_a_new_field_away_from_its_default_changes_the_hash() -> None:
    raw = _specs()["lenet-digits"]
    base = canonical_hash(JobSpec.model_validate(raw))
    padded = json.loads(json.dumps(raw))
    padded["model"]["stem_padding"] = "none"
    watched = json.loads(json.dumps(raw))
    watched["telemetry"] = {"every_steps": 5}
    hashes = {base, canonical_hash(JobSpec.model_validate(padded))}
    hashes.add(canonical_hash(JobSpec.model_validate(watched)))
    assert len(hashes) == 3
