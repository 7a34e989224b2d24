"""TLS: a federation over ``amqps://`` with a CA the test creates, and a wrong CA refused clearly.

The broker is a private RabbitMQ node on free ports (the machine's shared broker is never
reconfigured) with a TLS listener that verifies clients too (``fail_if_no_peer_cert``): the
aggregator and the workers present a client certificate signed by the test CA.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedmq.broker.rabbitmq import RabbitBroker
from fedmq.broker.rabbitmq_tls import TlsFiles
from fedmq.errors import BrokerConfigError

from federation_processes import REPO, Federation
from private_rabbitmq import PrivateRabbit, make_test_pki, rabbitmq_installed

pytestmark = pytest.mark.rabbitmq


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory):
    if not rabbitmq_installed():
        pytest.skip("RabbitMQ (rabbitmq-server) or openssl is not installed")
    base = tmp_path_factory.mktemp("tls")
    pki = make_test_pki(base / "pki")
    config = ["listeners.ssl.default = 127.0.0.1:{tls_port}", f"ssl_options.cacertfile = {pki.ca}",
              f"ssl_options.certfile = {pki.server_cert}", f"ssl_options.keyfile = {pki.server_key}",
              "ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = true"]
    with PrivateRabbit(base / "node", config) as node:
        yield node, pki


def url(node: PrivateRabbit) -> str:
    return f"amqps://guest:guest@localhost:{node.tls_port}/%2F"


def test_a_federation_over_amqps_with_the_test_ca(tls_node, tmp_path, data_root):
    node, pki = tls_node
    fed = Federation(tmp_path, data_root, url(node), "tls-run", FEDMQ_VERSIONS=2, FEDMQ_START_WORKERS=2,
                     FEDMQ_LOCAL_STEPS=30, FEDMQ_BROKER_CA_FILE=pki.ca, FEDMQ_BROKER_CERT_FILE=pki.client_cert,
                     FEDMQ_BROKER_KEY_FILE=pki.client_key)
    try:
        fed.aggregator()
        fed.worker("w0")
        fed.worker("w1")
        assert fed.wait_aggregator(240) == 0, fed.log("aggregator")[-3000:]
        records = fed.records()
        assert [r["version"] for r in records] == [1, 2]
        assert records[-1]["participants"] == 2
        assert records[-1]["test_accuracy"] >= 0.8  # 2 versions of 30 steps each on real MNIST
        assert "connected to localhost:" in fed.log("w0")
    finally:
        fed.close()
    # The node really speaks TLS only on that port: these connections were TLS ones.
    assert "accepting AMQP connection" in node.log() and f":{node.tls_port}" in node.log()


def test_a_wrong_ca_fails_at_once_with_a_clear_error(tls_node):
    node, pki = tls_node
    # connect_attempts=0 retries forever: only a configuration error ends this call.
    with pytest.raises(BrokerConfigError, match="the broker.s certificate is not trusted: self-signed certificate in certificate chain; it must be signed by the CA in --broker-ca-file"):
        RabbitBroker(url(node), connection_name="fedmq-test-tls", connect_attempts=0,
                     tls=TlsFiles(str(pki.other_ca), str(pki.client_cert), str(pki.client_key)))


def test_a_worker_with_a_wrong_ca_exits_with_the_reason(tls_node, tmp_path):
    node, pki = tls_node
    env = {"FEDMQ_BROKER_URL": url(node), "FEDMQ_BROKER_CA_FILE": str(pki.other_ca),
           "FEDMQ_BROKER_CERT_FILE": str(pki.client_cert), "FEDMQ_BROKER_KEY_FILE": str(pki.client_key),
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "fedmq_cli", "worker", "--worker-id", "tls-w"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "TLS: the broker's certificate is not trusted" in done.stderr
    assert str(pki.other_ca) in done.stderr  # it says which CA file to check


def test_tls_files_without_an_amqps_url_are_a_configuration_error(tls_node):
    node, pki = tls_node
    with pytest.raises(BrokerConfigError, match="not amqps://"):
        RabbitBroker(f"amqp://guest:guest@127.0.0.1:{node.amqp_port}/%2F", tls=TlsFiles(str(pki.ca)))


def test_no_client_certificate_is_refused_clearly(tls_node):
    node, pki = tls_node
    # With TLS 1.3 the refusal races the closed socket: the client reads the broker's alert or
    # only an EOF; either way it must say that a client certificate is what is missing.
    with pytest.raises(BrokerConfigError, match="certificate.*--broker-cert-file"):
        RabbitBroker(url(node), connection_name="fedmq-test-tls", connect_attempts=3, reconnect_initial_s=0.05,
                     tls=TlsFiles(str(pki.ca)))


def test_an_eof_after_the_handshake_names_the_missing_client_certificate():
    # The other side of the TLS 1.3 race above, made deterministic: only an EOF was read.
    from fedmq.broker.rabbitmq_tls import TlsFiles, tls_cut_off_without_certificate

    eof = OSError("Stream connection lost: SSLEOFError(8, 'EOF occurred in violation of protocol (_ssl.c:2427)')")
    error = tls_cut_off_without_certificate(eof, TlsFiles("ca.pem"))
    assert isinstance(error, BrokerConfigError) and "--broker-cert-file" in str(error)
    # With a certificate presented, or another failure, it is not a configuration error.
    assert tls_cut_off_without_certificate(eof, TlsFiles("ca.pem", "cert.pem", "key.pem")) is None
    assert tls_cut_off_without_certificate(OSError("Connection refused"), TlsFiles("ca.pem")) is None
