"""API keys configured but empty refuse to start; none configured turns authentication off."""

from __future__ import annotations

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
