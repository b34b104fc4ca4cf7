"""Link presets: registry, user-facing errors, free overrides."""

import pytest

from edgeprism.testbed.presets import LINK_PRESETS, LinkPreset, get_preset, parse_delay, parse_rate, resolve_link


def test_presets_have_sources_and_units():
    assert {"wifi5", "wifi4", "congested", "lan"} <= set(LINK_PRESETS)
    for preset in LINK_PRESETS.values():
        assert preset.rate_bps > 0 and preset.delay_s >= 0
        assert len(preset.source) > 20
    assert get_preset("wifi4").rate_bps == 50e6 and get_preset("wifi4").delay_s == 0.003


def test_unknown_preset_names_value_and_choices():
    with pytest.raises(ValueError, match=r"'wifi9'.*congested, lan, wifi4, wifi5"):
        get_preset("wifi9")


@pytest.mark.parametrize("rate", [0, -5e6, float("nan")])
def test_bad_rate_is_value_error(rate):
    with pytest.raises(ValueError, match="rate"):
        resolve_link(None, rate, 0.001)


def test_negative_delay_is_value_error():
    with pytest.raises(ValueError, match="delay"):
        resolve_link("wifi4", None, -0.001)


def test_free_values_override_preset():
    link = resolve_link("wifi4", 20e6, None)
    assert (link.name, link.rate_bps, link.delay_s) == ("wifi4+custom", 20e6, 0.003)
    assert resolve_link("lan") is get_preset("lan")
    custom = resolve_link(None, 10e6, 0.005)
    assert (custom.name, custom.rate_bps, custom.delay_s) == ("custom", 10e6, 0.005)
    with pytest.raises(ValueError, match="--link PRESET"):
        resolve_link(None, None, 0.003)


def test_json_round_trip_and_str():
    link = get_preset("congested")
    assert LinkPreset.from_json(link.to_json()) == link
    assert str(link) == "congested (15 Mbit/s, 8 ms one-way)"


def test_parse_units():
    assert parse_rate("50M") == 50e6 and parse_rate("1gbit") == 1e9 and parse_rate("2.5e7") == 2.5e7
    assert parse_delay("3ms") == pytest.approx(0.003) and parse_delay("0.01") == 0.01
    with pytest.raises(ValueError, match="'fast'"):
        parse_rate("fast")
    with pytest.raises(ValueError, match="'3 parsecs'"):
        parse_delay("3 parsecs")
