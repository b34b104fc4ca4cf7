"""A calibrated codec's state file reaches the devices that join a coordinator (runtime/codec_states.py).

Over a real store on loopback: the coordinator publishes the sealed state of each `tc:` codec its profile
lists; a device with an empty calibration folder installs it (hash checked) and then decodes the codec; a
tampered or forged state is refused; a coordinator without the file, or one that ships nothing, is a
clear error naming the digest. The last test is the whole path: an `edgeprism join` process with its own
`$EDGEPRISM_HOME` serves a plan that uses the coordinator's `tc:` codec.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from devices import EDGEPRISM, stop
from edgeprism.comm.auth import AuthError, new_secret, write_secret_file
from edgeprism.compress import get_codec
from edgeprism.compress.calibrated import fit_codec
from edgeprism.compress.calibrated_state import calibration_dir, load_calibrated, save
from edgeprism.evaluate.calibrated import exchanged_vectors
from edgeprism.models.config import get_config
from edgeprism.models.loading import load_model
from edgeprism.models.synthetic import synthetic_inputs
from edgeprism.plan.synthetic import synthetic_profile
from edgeprism.profile.fidelity import codec_entries
from edgeprism.runtime import EngineConfig, launch_engine
from edgeprism.runtime.codec_states import CODEC_KEY, install_codec_states, publish_codec_states

VIT = get_config("vit-tiny-test")
CONFIG = EngineConfig(min_stall_s=1.5, stall_factor=3.0, regroup_timeout_s=1.0, join_check_s=0.1, probe_every=0,
                      group_timeout_s=10.0, learn_compute=False, learn_link=False, learn_speeds=False)


def _calibrated_profile(home):
    """A tc: codec fitted on vit-tiny-test (seed 0, as the engine loads it), saved under `home`, and a profile
    whose only codec it is (slow devices, fast link: the planner splits)."""
    model = load_model("vit-tiny-test", seed=0)
    vectors = exchanged_vectors(model, [synthetic_inputs(VIT, 2, image_size=64, seed=s) for s in range(3)], 2)
    codec = fit_codec(vectors, VIT.hidden_size, delta=True, description="shipping test")
    assert save(codec).parent == home / "codecs"
    row = {"metric": "pooled_cosine", "value": 0.9999, "reference_value": 1.0}
    entries = codec_entries([codec], VIT.hidden_size, {codec.name: row}, num_layers=VIT.num_layers)
    profile = synthetic_profile("vit-tiny-test", bandwidth_bps=1e9, latency_s=1e-4, seconds_per_image=3000,
                                codecs=list(entries))
    return codec, profile


@pytest.fixture()
def store():
    server = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=10), wait_for_workers=False)
    server.set("auth/boot", b"nonce-1")
    yield server


def test_state_is_shipped_sealed_and_installed_where_it_is_missing(tmp_path, monkeypatch, store):
    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path / "coordinator"))
    codec, profile = _calibrated_profile(tmp_path / "coordinator")
    secret = new_secret()
    assert publish_codec_states(store, secret, b"nonce-1", profile) == [CODEC_KEY + codec.name]

    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path / "device"))  # a device that never saw the codec
    with pytest.raises(ValueError, match="copy the file"):
        load_calibrated(codec.name)
    with pytest.raises(AuthError, match=codec.name):  # another cluster's secret
        install_codec_states(store, new_secret(), profile, "coordinator")
    assert not list(tmp_path.glob("device/codecs/*.safetensors"))
    [path] = install_codec_states(store, secret, profile, "coordinator")
    assert path.parent == calibration_dir() == tmp_path / "device" / "codecs"
    assert load_calibrated(codec.name) == codec and path.read_bytes() == (tmp_path / "coordinator" / "codecs" /
                                                                         path.name).read_bytes()
    assert install_codec_states(store, secret, profile, "coordinator") == []  # already here: nothing fetched

    path.unlink()
    blob = store.get(CODEC_KEY + codec.name)
    store.set(CODEC_KEY + codec.name, blob[:-1] + bytes([blob[-1] ^ 1]))  # someone on the store flips a bit
    with pytest.raises(AuthError):
        install_codec_states(store, secret, profile, "coordinator")
    store.delete_key(CODEC_KEY + codec.name)  # a coordinator that ships nothing
    with pytest.raises(ValueError, match=f"{codec.name}.*copy {codec.digest[:12]}"):
        install_codec_states(store, secret, profile, "coordinator")
    assert not list(tmp_path.glob("device/codecs/*.safetensors"))

    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path / "empty"))  # a coordinator without the file refuses
    with pytest.raises(ValueError, match=f"codec '{codec.name}': 0 calibration files"):
        publish_codec_states(store, secret, b"nonce-1", profile)


def test_a_device_with_its_own_home_decodes_the_coordinators_calibrated_codec(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRISM_HOME", str(tmp_path / "coordinator"))
    codec, profile = _calibrated_profile(tmp_path / "coordinator")
    assert get_codec(codec.name) == codec
    secret_file = write_secret_file(tmp_path / "cluster.secret", new_secret())
    engine = launch_engine(2, "vit-tiny-test", profile, config=CONFIG, local_workers=False, bind_addr="127.0.0.1",
                           port=0, secret_file=secret_file)
    device = subprocess.Popen([*EDGEPRISM, "join", engine.address, "--secret-file", str(secret_file), "--timeout",
                               "30", "--cores", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env={**os.environ, "EDGEPRISM_HOME": str(tmp_path / "device")})
    try:
        inputs = synthetic_inputs(VIT, 2, image_size=64, seed=3)
        deadline = time.monotonic() + 60
        while engine.cluster_status()["members"] != [0, 1]:  # the ticker admits the device between requests
            assert device.poll() is None and time.monotonic() < deadline, device.communicate()
            time.sleep(0.1)
        result = engine.infer(inputs)
        assert result.metrics.mode == "distributed" and result.metrics.plan["codec"] == codec.name, result.metrics
        with torch.no_grad():
            reference = engine.model(inputs)["pooled"]
        cosine = torch.nn.functional.cosine_similarity(reference, result.outputs["pooled"], dim=-1)
        assert float(cosine.min()) > 0.99
        shipped = [p.name for p in (tmp_path / "device" / "codecs").glob("*.safetensors")]
        assert shipped == [f"{codec.digest}.safetensors"]
    finally:
        engine.close()
        stop(device)
