# A stand-in for python:3.11-slim-bookworm built only from Debian packages, for machines that
# cannot pull from a registry: its Debian base comes from debootstrap (tests/docker_local.py).
# Python 3.11 with pip in a virtual environment first on PATH, as in the official image. The
# build context holds the building machine's CA bundle (ca-certificates.crt), so that pip and
# apt work behind a TLS-inspecting proxy.
ARG DEBIAN_IMAGE=dicomnode-local/debian:bookworm
# hadolint ignore=DL3006
FROM ${DEBIAN_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python
# after the ca-certificates package, which would rewrite it
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PATH=/usr/local/python/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
