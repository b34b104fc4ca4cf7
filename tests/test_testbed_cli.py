"""`edgeprism testbed ...` and `edgeprism link-test`, through their own argparse shells."""

import argparse
import json
import os

import pytest

from edgeprism.cli import link_test, testbed


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="edgeprism")
    sub = parser.add_subparsers(dest="command")
    testbed.add_parser(sub)
    link_test.add_parser(sub)
    args = parser.parse_args(argv)
    return args.handler(args)


def test_unknown_preset_and_bad_rate_are_value_errors():
    with pytest.raises(ValueError, match="unknown link preset 'wifi9'"):
        run_cli(["link-test", "--link", "wifi9"])
    with pytest.raises(ValueError, match="rate 0.0 bit/s is not a positive number"):
        run_cli(["link-test", "--rate", "0"])


def test_up_status_set_link_down_loopback(capsys):
    assert run_cli(["testbed", "up", "--backend", "loopback", "--link", "wifi5", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["emulation"] == "loopback-transport" and made["link"]["name"] == "wifi5"
    try:
        assert run_cli(["testbed", "status", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert any(tb["tag"] == made["tag"] and tb["persistent"] for tb in info["testbeds"])
        assert run_cli(["testbed", "set-link", made["tag"], "--link", "congested"]) == 0
        with open(made["link_file"]) as fh:
            assert json.load(fh)["preset"] == "congested"
    finally:
        assert run_cli(["testbed", "down", made["tag"]]) == 0
    assert not os.path.exists(made["link_file"])
    with pytest.raises(ValueError, match="no testbed"):
        run_cli(["testbed", "down", made["tag"]])


def test_link_test_json_keys_loopback(capsys):
    assert run_cli(["link-test", "--link", "congested", "--backend", "loopback", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    for key in ("bandwidth_bps", "latency_s", "preset", "preset_rate_bps", "preset_delay_s", "emulation"):
        assert key in row
    assert row["preset"] == "congested" and row["emulation"] == "loopback-transport"
