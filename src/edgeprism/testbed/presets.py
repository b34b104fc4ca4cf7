"""Named link presets: the rate and one-way delay of the links the testbed emulates.

A preset is data (STYLE 5): a frozen `LinkPreset` in the `LINK_PRESETS` registry, with the source of
its figures in `source`. The figures are *representative* of the link class, not a measurement of
one particular access point; docs/TESTBED.md says how faithfully the testbed reproduces them.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

__all__ = [
    "LINK_PRESETS",
    "LinkPreset",
    "format_delay",
    "format_rate",
    "get_preset",
    "parse_delay",
    "parse_rate",
    "resolve_link",
]


@dataclasses.dataclass(frozen=True)
class LinkPreset:
    """One emulated link between a device and the shared medium (the WiFi access point)."""

    name: str
    """Registry key, or "custom" for free `--rate`/`--delay` values."""
    rate_bps: float
    """Sustained application-level throughput in bits per second, each direction."""
    delay_s: float
    """One-way latency of one message hop in seconds."""
    source: str
    """Where the figures come from."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate_bps) and self.rate_bps > 0):
            raise ValueError(
                f"link rate {self.rate_bps!r} bit/s is not a positive number; pass e.g. --rate 50e6 for 50 Mbit/s"
            )
        if not (math.isfinite(self.delay_s) and self.delay_s >= 0):
            raise ValueError(
                f"link delay {self.delay_s!r} s is not a number >= 0; pass e.g. --delay 0.003 for 3 ms"
            )

    def __str__(self) -> str:
        return f"{self.name} ({format_rate(self.rate_bps)}, {format_delay(self.delay_s)} one-way)"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> LinkPreset:
        if isinstance(data, str):
            data = json.loads(data)
        return cls(**data)


def format_rate(rate_bps: float) -> str:
    if rate_bps >= 1e9:
        return f"{rate_bps / 1e9:g} Gbit/s"
    if rate_bps >= 1e6:
        return f"{rate_bps / 1e6:g} Mbit/s"
    return f"{rate_bps / 1e3:g} kbit/s"


def format_delay(delay_s: float) -> str:
    return f"{delay_s * 1e3:g} ms"


# Sources. Throughput: achievable TCP goodput is roughly half of the PHY rate on WiFi (MAC overhead,
# contention, rate adaptation); latency: the WiFi hop is the largest part of a wireless client's RTT.
_SRC_LATENCY = (
    "one-way WiFi-hop latency of a few ms in the median, tens of ms in the tail: "
    "Pei et al., 'WiFi Can Be the Weakest Link of Round Trip Network Latency in the Wild', IEEE INFOCOM 2016; "
    "Sui et al., 'Characterizing and Improving WiFi Latency in Large-Scale Operational Networks', ACM MobiSys 2016"
)

LINK_PRESETS: dict[str, LinkPreset] = {
    p.name: p
    for p in (
        LinkPreset(
            name="wifi5",
            rate_bps=100e6,
            delay_s=0.002,
            source=(
                "IEEE 802.11ac, 1 spatial stream, 80 MHz: 433 Mbit/s PHY; an edge board's single antenna at "
                "room distance through one wall typically gets ~100 Mbit/s TCP goodput. " + _SRC_LATENCY
            ),
        ),
        LinkPreset(
            name="wifi4",
            rate_bps=50e6,
            delay_s=0.003,
            source=(
                "IEEE 802.11n, 1-2 spatial streams, 20-40 MHz: 72-150 Mbit/s PHY, ~50 Mbit/s TCP goodput in "
                "an ordinary room. " + _SRC_LATENCY
            ),
        ),
        LinkPreset(
            name="congested",
            rate_bps=15e6,
            delay_s=0.008,
            source=(
                "a shared 2.4 GHz 802.11n channel with several busy stations: the per-station share of the "
                "airtime falls to ~15 Mbit/s and the WiFi hop's latency moves toward its tail. " + _SRC_LATENCY
            ),
        ),
        LinkPreset(
            name="lan",
            rate_bps=1e9,
            delay_s=0.0002,
            source=(
                "IEEE 802.3ab 1000BASE-T line rate through one switch; ~0.2 ms one-way including both "
                "hosts' network stacks (typical switched-LAN ping RTT of 0.3-0.5 ms)"
            ),
        ),
    )
}


_RATE_UNITS = {"": 1.0, "bit": 1.0, "k": 1e3, "kbit": 1e3, "m": 1e6, "mbit": 1e6, "g": 1e9, "gbit": 1e9}
_DELAY_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


def _split_number(text: str) -> tuple[float, str]:
    text = text.strip().lower()
    i = len(text)
    while i > 0 and text[i - 1].isalpha():
        i -= 1
    return float(text[:i]), text[i:]


def parse_rate(text: str | float) -> float:
    """Bits per second from "50e6", "50M", "50mbit" or "1G"; ValueError naming the value otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        number, unit = _split_number(text)
        return number * _RATE_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"rate {text!r} is not a rate; give bits per second such as 50e6, 50M or 50mbit") from None


def parse_delay(text: str | float) -> float:
    """Seconds from "0.003", "3ms" or "300us"; ValueError naming the value otherwise."""
    if isinstance(text, (int, float)):
        return float(text)
    try:
        number, unit = _split_number(text)
        return number * _DELAY_UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"delay {text!r} is not a delay; give seconds such as 0.003 or 3ms") from None


def get_preset(name: str) -> LinkPreset:
    """The registered preset called `name`; ValueError listing the known ones otherwise."""
    try:
        return LINK_PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(LINK_PRESETS))
        raise ValueError(
            f"unknown link preset {name!r}; known presets: {known} (or give --rate BPS and --delay S)"
        ) from None


def resolve_link(preset: str | None, rate_bps: float | None = None, delay_s: float | None = None) -> LinkPreset:
    """The link a user asked for: a preset, with free `rate_bps`/`delay_s` overriding its values.

    Without a preset both free values are needed. The result is named after the preset, with
    "+custom" appended when a free value changed it, or "custom" without a preset.
    """
    if preset is None:
        if rate_bps is None:
            known = ", ".join(sorted(LINK_PRESETS))
            raise ValueError(f"no link given; pass --link PRESET (one of {known}) or --rate BPS [--delay S]")
        return LinkPreset("custom", float(rate_bps), float(delay_s or 0.0), "given on the command line")
    base = get_preset(preset)
    if rate_bps is None and delay_s is None:
        return base
    return LinkPreset(
        name=f"{base.name}+custom",
        rate_bps=float(base.rate_bps if rate_bps is None else rate_bps),
        delay_s=float(base.delay_s if delay_s is None else delay_s),
        source=f"{base.name} preset with values given on the command line",
    )
