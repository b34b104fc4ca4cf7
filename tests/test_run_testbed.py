"""The exactness check with each rank on its own testbed host (namespace), launched by torchrun."""

import json
import shutil

import pytest

from edgeprism.cli.main import main

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(shutil.which("ip") is None or shutil.which("tc") is None, reason="needs ip and tc")]


@pytest.mark.parametrize("model,extra", [("vit-tiny-test", []), ("bert-tiny-test", ["--padded", "--batch", "2"])])
def test_full_exchange_equals_single_device_across_namespaces(model, extra, capsys):
    code = main(["run", "--model", model, "--world-size", "2", "--shares", "0.6,0.4", "--link", "wifi4",
                 "--backend", "netns", "--compare-local", "--json", "--repeats", "1", *extra])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["emulation"] == "netns+tbf" and result["preset"] == "wifi4"
    assert result["max_abs_diff"] <= 1e-5
    assert result["emulated_delay_s"] > 0  # the link's one-way latency was applied per message
