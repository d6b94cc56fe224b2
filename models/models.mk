# Included by the Makefile: fetch the default base models into models/cache/ (no-op when present).
PYTHON ?= python3

.PHONY: models

models:
	$(PYTHON) models/fetch.py
