"""TLS for ``amqps://`` broker URLs: the client's SSL context, and TLS failures that no retry fixes.

The broker's certificate is checked against ``ca_file`` (the system's CAs when empty) and its
host name; ``cert_file``/``key_file`` present a client certificate to brokers that ask for one
(``ssl_options.verify = verify_peer`` with ``fail_if_no_peer_cert = true``).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from fedmq.errors import BrokerConfigError


@dataclass(frozen=True)
class TlsFiles:
    """PEM files; empty strings mean "not given"."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @property
    def given(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file)


def _readable(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise BrokerConfigError(f"TLS: the {what} file {path!r} does not exist")


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """An SSL context that verifies the broker (certificate chain and host name)."""
    if files.key_file and not files.cert_file:
        raise BrokerConfigError("TLS: a client key needs its certificate (--broker-cert-file)")
    for path, what in ((files.ca_file, "CA"), (files.cert_file, "client certificate"), (files.key_file, "client key")):
        if path:
            _readable(path, what)
    try:
        context = ssl.create_default_context(cafile=files.ca_file or None)
    except ssl.SSLError as exc:
        raise BrokerConfigError(f"TLS: cannot read the CA file {files.ca_file!r}: {exc}") from None
    if files.cert_file:
        try:
            context.load_cert_chain(files.cert_file, files.key_file or None)
        except (ssl.SSLError, OSError) as exc:
            raise BrokerConfigError(f"TLS: cannot use the client certificate {files.cert_file!r} "
                                    f"with key {files.key_file or files.cert_file!r}: {exc}") from None
    return context


def tls_refusal(exc: BaseException, ca_file: str) -> BrokerConfigError | None:
    """The configuration error for a TLS handshake that failed for good, else None.

    A broker certificate that does not verify fails the same way on every attempt, so it is
    reported at once (with what to check) instead of being retried forever.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        where = f"the CA in --broker-ca-file ({ca_file})" if ca_file else "the system's CAs (no --broker-ca-file)"
        return BrokerConfigError(f"TLS: the broker's certificate is not trusted: {exc.verify_message}; "
                                 f"it must be signed by {where} and name the URL's host")
    text = str(exc)
    if "CERTIFICATE_REQUIRED" in text or "TLSV1_ALERT_UNKNOWN_CA" in text or "BAD_CERTIFICATE" in text:
        return BrokerConfigError(f"TLS: the broker refused this client's certificate ({text}); give one it "
                                 "trusts with --broker-cert-file and --broker-key-file")
    return None


def tls_cut_off_without_certificate(exc: BaseException, files: TlsFiles) -> BrokerConfigError | None:
    """The likely configuration error when every TLS attempt ended in an EOF and this client
    presented no certificate, else None.

    With TLS 1.3 the broker checks the client's certificate after the client thinks the handshake
    is done: its "certificate required" alert and the closed socket race, and the client often
    reads only an EOF. A broker that cuts off every certificate-less attempt that way is almost
    always one that requires client certificates (``fail_if_no_peer_cert``).
    """
    if files.cert_file or "EOF occurred in violation of protocol" not in str(exc):
        return None
    return BrokerConfigError("TLS: the broker closed every connection right after the handshake, and this client "
                             "presented no certificate: a broker that requires client certificates does that; give "
                             "one it trusts with --broker-cert-file and --broker-key-file")

