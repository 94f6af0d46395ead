"""Config names from YAML to loss: Nash-MD's β is ``beta`` (``mixture`` still read, with a warning), and oracle configs
are validated once, in the oracles layer, by ``parse_oracle_config``."""

from __future__ import annotations

import logging

import pytest

from nashray.cluster.config import ConfigError, NashMD, load_config, parse_config
from nashray.oracles.config import (EnsembleOracleConfig, RuleOracleConfig, SentimentOracleConfig,
                                    parse_oracle_config)


def test_nash_md_mixture_from_a_yaml_file_still_loads_as_beta_with_a_warning(tmp_path, caplog):
    path = tmp_path / "campaign.yaml"
    path.write_text("algorithm:\n  name: nash_md\n  mixture: 0.2\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING), pytest.warns(DeprecationWarning, match="algorithm.beta"):
        cfg = load_config(path)
    assert isinstance(cfg.algorithm, NashMD) and cfg.algorithm.beta == 0.2
    assert "call it algorithm.beta" in caplog.text
    assert "mixture" not in cfg.algorithm.model_dump()  # written back (config.yaml of a run) under its new name


def test_nash_md_mixture_in_a_dict_still_loads_as_beta_and_both_names_are_refused():
    with pytest.warns(DeprecationWarning, match="mixture of nash_md is deprecated"):
        assert parse_config({"algorithm": {"name": "nash_md", "mixture": 0.2}}).algorithm.beta == 0.2
    assert parse_config({"algorithm": {"name": "nash_md", "beta": 0.3}}).algorithm.beta == 0.3
    with pytest.raises(ConfigError, match="algorithm.nash_md: .*give beta only"):
        parse_config({"algorithm": {"name": "nash_md", "beta": 0.2, "mixture": 0.2}})
    with pytest.raises(ConfigError, match="algorithm.nash_md.beta"):
        parse_config({"algorithm": {"name": "nash_md", "beta": 1.5}})


def test_parse_oracle_config_validates_a_dict_once_and_returns_a_model_as_it_is():
    rule = parse_oracle_config({"kind": "rule", "rule": "arithmetic"})
    assert isinstance(rule, RuleOracleConfig) and rule.rule == "arithmetic"
    assert parse_oracle_config(rule) is rule
    panel = parse_oracle_config({"kind": "ensemble", "members": [{"kind": "sentiment"}, rule.model_dump()]})
    assert isinstance(panel, EnsembleOracleConfig) and isinstance(panel.members[0], SentimentOracleConfig)


@pytest.mark.parametrize("value, message", [
    ({"kind": "ensemble", "members": [{"kind": "rule"}]}, "invalid oracle config: ensemble.members.0.rule.rule: "
                                                          "Field required"),
    ({"kind": "http", "url": "https://user:secret@judge.example"}, "http.url: .*must not carry credentials"),
    ({"kind": "nope"}, "tag 'nope'"),
    ({"rule": "arithmetic"}, "kind"),
    ("rule", "expected a mapping"),
])
def test_parse_oracle_config_errors_name_the_field(value, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_oracle_config(value)
    assert "secret" not in str(err.value)  # a rejected URL is not repeated


def test_the_config_tree_holds_the_oracles_own_config_models():
    from nashray.cluster.config import JudgeConfig, parse_config
    from nashray.oracles import config as oracle_config
    assert isinstance(JudgeConfig().oracle, oracle_config.RuleOracleConfig)
    panel = parse_config({"judges": {"oracle": {"kind": "ensemble", "members": [{"kind": "sentiment"}]}}})
    assert isinstance(panel.judges.oracle, oracle_config.EnsembleOracleConfig)
    assert isinstance(panel.judges.oracle.members[0], oracle_config.SentimentOracleConfig)
    with pytest.raises(ValueError, match="a NashMD is not an oracle config"):
        parse_oracle_config(NashMD(name="nash_md"))
