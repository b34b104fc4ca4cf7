"""`edgeprism run`: the JSON report, and bad input refused before any worker starts."""

import json

import pytest

from edgeprism.cli.main import main


def test_run_vit_uneven_shares_matches_local(capsys):
    code = main(["run", "--model", "vit-tiny-test", "--world-size", "3", "--shares", "0.5,0.3,0.2",
                 "--compare-local", "--json", "--repeats", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("mode", "world_size", "batch", "latency_s", "bytes_exchanged", "staging_s", "collective_s"):
        assert key in result
    assert result["mode"] == "distributed" and result["world_size"] == 3
    assert result["token_ranges"] == [[0, 9], [9, 14], [14, 17]]
    assert result["max_abs_diff"] <= 1e-5
    # fp32 full exchange: per layer each rank sends its padded message (9 tokens x 64 x 4 B + 9 mask bytes)
    assert result["bytes_exchanged"] == 2 * 3 * (9 * 64 * 4 + 9)
    assert result["fidelity_loss"] == 0.0 and [t["layer"] for t in result["timeline"]] == [0, 1]


def test_run_local_mode(capsys):
    assert main(["run", "--model", "bert-tiny-test", "--world-size", "1", "--json", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "local" and result["bytes_exchanged"] == 0 and result["fidelity_loss"] == 0.0


@pytest.mark.parametrize("argv,message", [
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "vit-tiny-test", "--image-size", "30"], "30x30"),
    (["--model", "bert-tiny-test", "--seq-len", "500"], "longer than bert-tiny-test's 128 positions"),
    (["--model", "bert-tiny-test", "--seq-len", "3", "--world-size", "4"], "4 ranks for a request of 3 tokens"),
    (["--model", "vit-tiny-test", "--world-size", "2", "--shares", "0.5,0.6"], "sum to"),
    (["--model", "vit-tiny-test", "--world-size", "2", "--shares", "1,0"], "> 0"),
    (["--model", "vit-tiny-test", "--world-size", "3", "--shares", "0.5,0.5"], "2 shares"),
    (["--model", "vit-tiny-test", "--codec", "zip9"], "zip9"),
    (["--model", "vit-tiny-test", "--checkpoint", "/nonexistent/dir"], "does not exist"),
])
def test_bad_input_is_refused_with_the_value(argv, message, capsys):
    assert main(["run", *argv]) == 2
    assert message in capsys.readouterr().err
