"""DICOM TLS (PS3.15 Annex B.9, the BCP 195 profiles): the SSL contexts of the receiver and of
every SCU (push, ``send``, ``echo``), built once from the config's certificate files.

Both sides authenticate: the receiver asks for a client certificate signed by its CA bundle
(``require_client_certificate``), and a client checks the peer's certificate against its own
bundle. TLS 1.2 is the floor; the TLS 1.2 cipher suites are the BCP 195 non-downgrading set
(ECDHE/DHE with AES-GCM), TLS 1.3 uses its own (all AEAD). Host names are not checked: DICOM
peers are configured by address and their certificates rarely name it (DCMTK does not check
them either); trust comes from the CA bundle.
"""

from __future__ import annotations

import ssl

from dicomnode.settings import NodeTLS, TLSFiles

__all__ = ["BCP195_CIPHERS", "client_context", "server_context"]

BCP195_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
])


def _harden(context: ssl.SSLContext, files: TLSFiles) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.load_cert_chain(certfile=str(files.certificate), keyfile=str(files.private_key))
    context.load_verify_locations(cafile=str(files.ca_certificates))
    return context


def server_context(tls: NodeTLS) -> ssl.SSLContext:
    """The receiver's context: its certificate, and client certificates required (unless the
    config says otherwise) and checked against ``ca_certificates``.

    Raises
    ------
    ssl.SSLError, OSError
        A certificate or key file that cannot be read or does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_certificate
                           else ssl.CERT_OPTIONAL)
    return _harden(context, tls)


def client_context(tls: TLSFiles) -> ssl.SSLContext:
    """An SCU's context: the peer's certificate checked against ``ca_certificates``, this
    side's certificate offered for mutual authentication.

    Raises
    ------
    ssl.SSLError, OSError
        A certificate or key file that cannot be read or does not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # Purpose.SERVER_AUTH: verifies the peer
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return _harden(context, tls)
