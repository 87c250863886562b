# napari-meddiff developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
OUT ?= out/demo
XVFB := xvfb-run -a -s "-screen 0 1600x1000x24"
APT_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
	libxcb-cursor0 libdbus-1-3 libfontconfig1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
LINT_PATHS := napari_meddiff tests benchmarks examples setup.py

.PHONY: help demo venv system-deps lint format test test-slow napari benchmarks clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

# torch goes in first, pinned, so pip never pulls multi-GB CUDA wheels on a CPU machine
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip uninstall -q -y PyQt5 PyQt5-Qt5 PyQt5_sip 2>/dev/null || true  # was in [testing]; qtpy would still pick it
	$(BIN)/python -m pip install -q -e ".[napari,testing,dev]"
	touch $@

venv: $(BIN)/.installed  ## create .venv (CPU torch first) and install the package with its extras

demo: venv  ## generate a synthetic brain with the default model into out/demo/
	$(BIN)/meddiff models
	$(BIN)/meddiff generate --num 1 --seed 0 --out $(OUT)
	@echo "Open it in napari: make napari FILE=$$(ls -t $(OUT)/*.nii.gz | head -n 1)"

system-deps:  ## install Xvfb and Mesa (napari tests need a display and OpenGL)
	@command -v xvfb-run >/dev/null && [ -e /usr/lib/x86_64-linux-gnu/dri/swrast_dri.so -o -e /usr/lib/aarch64-linux-gnu/dri/swrast_dri.so ] \
		|| ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PACKAGES))

lint: venv  ## ruff check (pyflakes, pycodestyle, isort, bugbear, pyupgrade) and ruff format --check
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: venv  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

test: venv system-deps lint  ## lint, then the test suite under Xvfb (under 15 min on 2 cores)
	$(XVFB) $(BIN)/python -m pytest -q

test-slow: venv system-deps  ## slow checks: training, full benchmarks (-m slow)
	$(XVFB) $(BIN)/python -m pytest -q -m slow

napari: venv  ## open napari with the plugin: make napari FILE=scan.nii.gz
	$(BIN)/napari $(FILE) --plugin napari-meddiff

benchmarks: venv  ## quick benchmarks: start-up and sampling speed (results in benchmarks/results/)
	$(BIN)/python benchmarks/bench_startup.py
	$(BIN)/python benchmarks/bench_speed.py --quick

clean:  ## remove .venv and out/
	rm -rf $(VENV) out
