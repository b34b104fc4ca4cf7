"""The testbed itself: namespaces, shaped links, fallback, and that nothing is ever left behind."""

import os
import shutil
import subprocess
import sys
import warnings

import pytest

from edgeprism.testbed import net, netns
from edgeprism.testbed.leftovers import cleanup_stale, status
from edgeprism.testbed.net import Testbed
from edgeprism.testbed.presets import get_preset

HAVE_IP = shutil.which("ip") is not None and shutil.which("tc") is not None


def ep_namespaces(tag):
    return [ns for ns in netns.netns_list() if ns.startswith(f"ep-{tag}-")]


def qdiscs(netns, dev):
    return subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout


def test_loopback_fallback_says_it_is_emulated():
    with Testbed(2, get_preset("wifi4"), backend="loopback") as tb:
        assert tb.emulation == "loopback-transport"
        assert "EMULATED" in tb.describe()
        assert [h.netns for h in tb.hosts] == [None, None]
        assert tb.rdzv_endpoint.startswith("127.0.0.1:")
        with open(tb.link_file) as fh:
            assert '"mode": "transport"' in fh.read()
    assert not os.path.exists(tb.link_file) and not os.path.exists(tb.state_file)


def test_without_ip_auto_falls_back_with_warning_and_netns_is_error(monkeypatch):
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    with pytest.warns(UserWarning, match="falling back to loopback"):
        tb = Testbed(2, get_preset("lan"))
    assert tb.emulation == "loopback-transport"
    with pytest.raises(ValueError, match="apt-get install iproute2"):
        Testbed(2, get_preset("lan"), backend="netns")


def test_more_hosts_than_cores_warns():
    cores = len(os.sched_getaffinity(0))
    with pytest.warns(UserWarning, match="share cores"):
        with Testbed(cores + 1, get_preset("lan"), backend="loopback") as tb:
            assert len(tb.hosts) == cores + 1


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="num_hosts=0"):
        Testbed(0, get_preset("lan"), backend="loopback")
    with pytest.raises(ValueError, match="cores_per_host=0"):
        Testbed(2, get_preset("lan"), cores_per_host=0, backend="loopback")


@pytest.mark.root
@pytest.mark.skipif(not HAVE_IP, reason="needs ip and tc (iproute2)")
def test_netns_up_shapes_both_directions_changes_live_and_cleans_up():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a 2-core CI box may warn about shared cores
        tb = Testbed(2, get_preset("wifi4"), backend="netns")
    with tb:
        assert tb.emulation == "netns+tbf"
        assert sorted(ep_namespaces(tb.tag)) == sorted(tb.namespaces)
        h0, h1 = tb.hosts
        assert h0.address.endswith(".101") and h1.address.endswith(".102")
        assert "rate 50Mbit" in qdiscs(h0.netns, "eth0")        # upload
        assert "rate 50Mbit" in qdiscs(tb.namespaces[-1], "h0")  # download
        # The hosts reach each other over the bridge (bash's /dev/tcp needs no ping binary).
        server = subprocess.Popen(["ip", "netns", "exec", h1.netns, sys.executable, "-c",
                                   "import socket; s=socket.socket(); s.bind(('0.0.0.0', 45999)); s.listen(1); "
                                   "c,_=s.accept(); c.sendall(b'ok')"])
        try:
            client = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    h0.netns,
                    sys.executable,
                    "-c",
                    "import socket,time\nfor i in range(50):\n try: c=socket.create_connection(('%s',45999)); break\n"
                    " except OSError: time.sleep(0.1)\nprint(c.recv(2).decode())" % h1.address,
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert client.stdout.strip() == "ok", client.stderr
        finally:
            server.kill()
            server.wait()
        tb.set_link(get_preset("lan"))
        assert "rate 1Gbit" in qdiscs(h1.netns, "eth0") and "rate 1Gbit" in qdiscs(tb.namespaces[-1], "h1")
        with open(tb.link_file) as fh:
            assert '"preset": "lan"' in fh.read()
        assert any(s["tag"] == tb.tag for s in status()["testbeds"])
    assert ep_namespaces(tb.tag) == []
    assert not os.path.exists(tb.state_file)


@pytest.mark.root
@pytest.mark.skipif(not HAVE_IP, reason="needs ip and tc (iproute2)")
def test_subnet_in_use_is_value_error():
    with Testbed(1, get_preset("lan"), backend="netns") as first:
        with pytest.raises(ValueError, match=f"subnet {first.subnet} is already in use.*--subnet"):
            Testbed(1, get_preset("lan"), backend="netns", subnet=first.subnet).up()
    assert ep_namespaces(first.tag) == []


@pytest.mark.root
@pytest.mark.skipif(not HAVE_IP, reason="needs ip and tc (iproute2)")
def test_killed_owner_leaves_nothing_after_cleanup_stale():
    """A process that made a testbed and was SIGKILLed: cleanup_stale removes its namespaces and files."""
    code = ("import os, signal, warnings; warnings.simplefilter('ignore')\n"
            "from edgeprism.testbed.net import Testbed\nfrom edgeprism.testbed.presets import get_preset\n"
            "tb = Testbed(2, get_preset('wifi4'), backend='netns').up(); print(tb.tag, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    tag = proc.stdout.strip()
    assert tag and len(ep_namespaces(tag)) == 3, proc.stderr
    removed = cleanup_stale()
    assert f"testbed {tag}" in removed
    assert ep_namespaces(tag) == []
    assert not any(name.startswith(f"ep-{tag}") for name in os.listdir(net.state_dir()))
