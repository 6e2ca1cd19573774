# drb-uring: `make demo` and `make test` do all set-up themselves.
# The virtualenv is made from Debian's python3 so bcc (python3-bpfcc) imports.

VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# Everything the installed package is made of, eBPF sources included (the
# installed `drb` loads its programs from the package).
SRC    := $(shell find cython_ext drb_uring bpf -name '*.pyx' -o -name '*.pxd' -o -name '*.h' \
                   -o -name '*.py' -o -name '*.service') $(wildcard bpf/*.c) setup.py setup.cfg pyproject.toml
PYTEST_ARGS ?=

.PHONY: all setup system build demo test fuzz soak bench bench-ring annotate debug clean

all: setup

setup: system build

system:
	@bash scripts/setup-system.sh

$(VENV)/.stamp-venv: requirements-dev.txt
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PIP) install -r requirements-dev.txt
	@touch $@

# In-place extensions for the source tree (tests and tools run from it), and
# a regular, non-editable install into the virtualenv (what `drb` runs).
$(VENV)/.stamp-build: $(VENV)/.stamp-venv $(SRC)
	@echo "setup: building the Cython extensions"
	@$(PY) setup.py -q build_ext --inplace 2>&1 | grep -vE '^(Compiling|\[|warning: no files)' || true
	@$(PY) -c 'import drb_uring.ring._spsc, drb_uring.channel._worker, drb_uring.enforce._task, drb_uring.disk._fuseloop'
	@$(PIP) install --no-build-isolation --no-deps --force-reinstall . 2>&1 | grep -v 'DEPRECATION' || true
	@touch $@

build: $(VENV)/.stamp-build

demo: setup
	$(VENV)/bin/drb demo

# The paper's comparison in real domains (~3 minutes), then its report.
bench: setup
	@mkdir -p bench/results
	$(VENV)/bin/drb bench --quick --json bench/results/quick.json
	$(VENV)/bin/drb report bench/results/quick.json --out bench/results/quick

# Kills under load for SOAK_MINUTES (default 30), then every acknowledged
# write checked; `make test` runs a one-minute version.
SOAK_MINUTES ?= 30
soak: setup
	$(VENV)/bin/drb soak --minutes $(SOAK_MINUTES) --json bench/results/soak.json

bench-ring: setup
	@mkdir -p bench/results
	$(VENV)/bin/drb bench-ring --json bench/results/ring.json

# pytest's exit code 5 (no tests collected) counts as a failure.
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	 if [ $$rc -eq 5 ]; then echo "make test: no tests ran" >&2; exit 1; fi; exit $$rc

# The parsers' fuzzing properties for longer than the default run gives them.
fuzz: setup
	DRB_FUZZ_EXAMPLES=$${DRB_FUZZ_EXAMPLES:-50000} $(PY) -m pytest -q tests/unit/test_fuzz_parsers.py

# Annotated build: open cython_ext/drb_uring/*/*.html and look for yellow
# lines in the per-entry loops.
annotate: $(VENV)/.stamp-venv
	DRB_ANNOTATE=1 $(PY) setup.py -q build_ext --inplace --force

# Line tracing and debug macros, for coverage and profiling of Cython code.
debug: $(VENV)/.stamp-venv
	DRB_DEBUG=1 $(PY) setup.py -q build_ext --inplace --force

clean:
	rm -rf build dist *.egg-info $(VENV)
	find drb_uring cython_ext \( -name '*.so' -o -name '*.c' -o -name '*.html' \) -delete
