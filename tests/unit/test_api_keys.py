"""API keys configured but empty refuse to start; none configured turns authentication off."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest

from batchscore.core.errors import SettingsError
from batchscore.core.settings import ApiSettings
from lookup.security import ApiKeys


@pytest.mark.parametrize("text", ["", "\n\n", "# nobody yet\n   # still nobody\n"])
def test_a_keys_file_without_a_key_is_refused_naming_the_setting_and_file(
    tmp_path: Path, text: str
) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(text)
    with pytest.raises(SettingsError) as refused:
        ApiKeys.from_settings(ApiSettings(home=tmp_path, api_keys_file=keys_file))
    assert "BATCHSCORE_API_KEYS_FILE" in str(refused.value)
    assert str(keys_file) in str(refused.value)


def test_an_empty_keys_setting_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        ApiKeys.from_settings(ApiSettings(home=tmp_path, api_keys={}))
    assert "BATCHSCORE_API_KEYS" in str(refused.value)


def test_a_key_without_namespaces_is_refused_without_showing_the_key(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:
        ApiKeys.from_settings(ApiSettings(home=tmp_path, api_keys={"s3cret": []}))
    assert "s3cret" not in str(refused.value)


def test_no_keys_configured_at_all_is_authentication_off(tmp_path: Path) -> None:
    keys = ApiKeys.from_settings(ApiSettings(home=tmp_path))
    assert not keys.enabled
    assert keys.authenticate(None).may_read("anything")


def test_keys_from_the_setting_and_the_file_together(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# one\nk1: churn\n")
    keys = ApiKeys.from_settings(
        ApiSettings(home=tmp_path, api_keys={"k2": ["*"]}, api_keys_file=keys_file)
    )
    assert keys.authenticate("k1").may_read("churn")
    assert keys.authenticate("k2").may_read("fraud")


def test_keys_are_held_as_digests_and_named_by_8_hex_digits_of_the_digest(
    tmp_path: Path,
) -> None:
    keys = ApiKeys.from_settings(
        ApiSettings(home=tmp_path, api_keys={"s3cret-churn": ["churn"], "s3cret-all": ["*"]})
    )
    held = pickle.dumps(keys)  # everything the object keeps
    assert b"s3cret" not in held
    assert hashlib.sha256(b"s3cret-churn").digest() in held
    principal = keys.authenticate("s3cret-churn")
    assert principal.key_id == hashlib.sha256(b"s3cret-churn").hexdigest()[:8]
    assert len(principal.key_id) == 8 and int(principal.key_id, 16) >= 0
    assert keys.authenticate("s3cret-all").key_id == hashlib.sha256(b"s3cret-all").hexdigest()[:8]
