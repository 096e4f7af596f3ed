"""The training config: every error at once, "did you mean", --set overrides, presets that validate."""

import pytest

from dreambooth_dora.training.config import ConfigError, load_config, parse_overrides, validate
from tests.helpers import ROOT

BASE = {"instance_data_dir": "imgs", "instance_prompt": "a photo of sks dog"}


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"learning_rat: unknown key; did you mean 'learning_rate'\?"):
        validate({**BASE, "learning_rat": 1e-4})


def test_all_errors_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        validate({**BASE, "learning_rate": 0, "resolution": 500, "rank": "many", "lr_scheduler": "cosin"})
    text = str(err.value)
    assert "learning_rate: Input should be greater than 0 (got 0)" in text
    assert "resolution: must be a multiple of 8 (the VAE downsamples by 8); try 496 (got 500)" in text
    assert "rank: Input should be a valid integer" in text and "'many'" in text
    assert "lr_scheduler: Input should be 'constant'" in text


def test_missing_required_keys_are_named():
    with pytest.raises(ConfigError, match="instance_data_dir: required, not set"):
        validate({"instance_prompt": "x"})


def test_prior_preservation_needs_a_class_prompt():
    with pytest.raises(ConfigError, match="class_prompt: prior preservation needs a class prompt"):
        validate({**BASE, "with_prior_preservation": True})


def test_class_prompt_may_be_several():
    several = validate({**BASE, "with_prior_preservation": True, "class_prompt": ["a dog", "a dog on grass"]})
    assert several.class_prompt == ["a dog", "a dog on grass"]
    assert validate({**BASE, "class_prompt": ["a dog"]}).class_prompt == "a dog"  # a list of one is one prompt
    for bad in ([], ["a dog", " "]):
        with pytest.raises(ConfigError, match="class_prompt: a list of class prompts needs at least one"):
            validate({**BASE, "class_prompt": bad})


def test_overrides_parse_yaml_scalars_and_types_convert():
    assert parse_overrides(["rank=8", "kind=lora", "validation_prompt=null", "targets=[to_q, to_v]"]) == {
        "rank": 8,
        "kind": "lora",
        "validation_prompt": None,
        "targets": ["to_q", "to_v"],
    }
    cfg = validate({**BASE, **parse_overrides(["learning_rate=5e-5"])})  # YAML reads 5e-5 as a string
    assert cfg.learning_rate == 5e-5
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["rank"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = validate({**BASE, "rank": 8, "targets": ["to_q"]})
    path = tmp_path / "train_config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "training_configs").glob("*.yaml")))
def test_presets_validate_and_document_their_command(preset):
    path = ROOT / "training_configs" / preset
    text = path.read_text()
    assert text.startswith("#"), "each preset opens with a comment: purpose + exact command"
    assert f"python -m dreambooth_dora.train --config training_configs/{preset}" in text
    cfg = load_config(path)
    assert cfg.resolution % 8 == 0 and cfg.instance_prompt


def test_a_config_that_is_not_utf8_is_named_with_the_byte(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("instance_prompt: a photo of sks café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at position 35\); save the file as UTF-8"):
        load_config(path)


def test_a_set_value_that_is_not_yaml_says_how_to_quote_it():
    with pytest.raises(ConfigError, match=r"--set 'rank=\[1': not valid YAML: .*Quote a value"):
        parse_overrides(["rank=[1"])


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]  # 9^9 strings if expanded
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"uses 72 YAML aliases \(\*name\); at most 64 are accepted") as err:
        load_config(path)
    assert len(str(err.value)) < 500


def test_many_unknown_keys_give_a_short_error(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"key_{i}: {i}\n" for i in range(20_000)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "key_0: unknown key" in text and "… and 19982 more problems" in text  # 2 required keys are missing too
    assert text.count("valid keys:") == 1 and len(text) < 5_000


def test_a_file_too_large_for_a_config_is_refused_unread(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("".join(f"key_{i}: {i}\n" for i in range(190_000)))
    with pytest.raises(ConfigError, match=r"keys.yaml: 3387780 bytes is not a training config \(at most 1000000"):
        load_config(path)


def test_a_huge_value_is_shown_cut():
    with pytest.raises(ConfigError) as err:
        validate({**BASE, "rank": "9" * 100_000})
    assert "… (100002 characters)" in str(err.value) and len(str(err.value)) < 1_000
