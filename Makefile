# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install system-data demo test lock clean plots services services-stop deploy

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# What the tests need from Debian, installed when we may (root with apt), only what is missing:
# Fashion-MNIST (offline data), sshd for the SSH remote's test (tests/test_dvc_remote.py starts its own
# on a free localhost port), PostgreSQL for the team stack (make services; tests/test_services.py) and
# Chromium for the MLflow UI check. Services the install enables are stopped and disabled again: the
# tests start their own, on free ports.
system-data:
	@missing=""; \
	[ -d $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null || exit 1; \
		if [ -d /run/systemd/system ]; then \
			systemctl disable --now ssh.service ssh.socket postgresql.service >/dev/null 2>&1 || true; fi; \
	fi

demo: install
	$(BIN)/python -m flows.pipeline

test: install system-data
	@$(MAKE) --no-print-directory plots || echo "offline plots template not built (needs npm once): its tests skip"
	$(BIN)/pytest

# after a code change: rerun what changed and record it, so dvc.lock matches the committed code
lock: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

# A local team stack (PostgreSQL, MLflow and Prefect servers, a worker) on free localhost ports;
# `source .services.env` switches every command to it (docs/operations.md, "Team services").
services: install system-data
	$(BIN)/promptcil services start
services-stop:
	$(BIN)/promptcil services stop
# the flows as Prefect deployments on the stack (prefect.yaml; the retrain schedule from params.yaml)
deploy: install
	$(BIN)/promptcil deploy

clean:
	rm -rf outputs mlruns mlflow.db .pytest_cache

# `dvc plots show` offline: vega, vega-lite and vega-embed from npm (pinned, checked; npm runs only
# for a missing tarball) into the git-ignored .dvc/plots-offline/npm/, inlined into
# .dvc/plots-offline/template.html. Then `dvc plots show --html-template .dvc/plots-offline/template.html`
# (docs/operations.md, "DVC beyond one folder").
PLOTS_OFFLINE := .dvc/plots-offline
plots:
	$(PYTHON) $(PLOTS_OFFLINE)/build_template.py --npm-dir $(PLOTS_OFFLINE)/npm --out $(PLOTS_OFFLINE)/template.html
