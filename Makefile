# dicomnode: the two newcomer commands are `make demo` and `make test` (both create .venv).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := dcmtk dicom3tools dcm2niix orthanc orthanc-dicomweb chromium
OHIF_VERSION := 3.13.2
OHIF := .cache/ohif
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-fast lint typecheck sysdeps venv viewer screenshots bench clean

## Debian packages the node and its tests drive (installed only when missing).
sysdeps:
	@if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/dciodvfy ] || [ ! -x /usr/bin/dcm2niix ] \
	    || [ ! -x /usr/sbin/Orthanc ] || [ ! -x /usr/bin/chromium ] \
	    || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  echo "installing $(APT_PACKAGES) (apt-get)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	fi
	@# the docker test builds the image on a private dockerd: Debian's docker.io only where no
	@# dockerd exists (it would replace Docker CE's packages), debootstrap for the base image
	@if ! command -v dockerd >/dev/null || [ ! -x /usr/sbin/debootstrap ]; then \
	  echo "installing debootstrap$$(command -v dockerd >/dev/null || echo ' docker.io') (apt-get)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends debootstrap $$(command -v dockerd >/dev/null || echo docker.io) \
	    >/dev/null; \
	fi

## The virtual environment: torch==2.13.0 (CPU build) first, so nothing pulls a CUDA torch.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,postgres,ml,jpeg,celery]'
	touch $(STAMP)

venv: $(STAMP)

## The OHIF web viewer (the prebuilt @ohif/app release from npm, checked by npm against the
## registry's sha512), unpacked under .cache/ohif: served locally by dicomnode.demo.viewer.
$(OHIF)/$(OHIF_VERSION)/dist/index.html:
	rm -rf $(OHIF) && mkdir -p $(OHIF)/$(OHIF_VERSION)
	cd $(OHIF) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null
	tar xzf $(OHIF)/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF)/$(OHIF_VERSION) --strip-components=1 package/dist
	rm $(OHIF)/ohif-app-$(OHIF_VERSION).tgz
	ln -sfn $(OHIF_VERSION)/dist $(OHIF)/dist

viewer: $(OHIF)/$(OHIF_VERSION)/dist/index.html

## The viewer screenshots in docs/img, from the viewer tests (a real CT and PET, OHIF, Chromium).
screenshots: sysdeps venv viewer
	DICOMNODE_SCREENSHOTS=docs/img $(VENV)/bin/pytest -q -m viewer

## Start a local PACS (Orthanc), the node on config/dicomnode.yaml, send a CT, print a report.
demo: sysdeps venv
	$(PY) -m dicomnode.demo

## Lint, type-check and run the whole test suite (real DCMTK, Orthanc, PostgreSQL, dciodvfy).
test: sysdeps venv viewer
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q

## The fast tier, for every change: everything but the tests marked slow.
test-fast: sysdeps venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff check .

typecheck: venv
	$(VENV)/bin/mypy

bench: sysdeps venv
	$(PY) -m bench.ingest

clean:
	rm -rf var bench/work build *.egg-info .pytest_cache .mypy_cache .ruff_cache
