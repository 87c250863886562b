# napari-meddiff: `make demo` (generate a synthetic brain) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
OUT ?= out/demo
APT_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 \
	libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 \
	libxcb-cursor0 libdbus-1-3 libfontconfig1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-slow napari venv system-deps benchmarks clean

# torch goes in first, pinned, so pip never pulls multi-GB CUDA wheels on a CPU machine
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[napari,testing]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/meddiff models
	$(BIN)/meddiff generate --num 1 --seed 0 --out $(OUT)
	@echo "Synthetic volume written to $(OUT)/ (open it in napari: make napari FILE=$(OUT)/<file>)"

system-deps:
	@command -v xvfb-run >/dev/null && [ -e /usr/lib/x86_64-linux-gnu/dri/swrast_dri.so -o -e /usr/lib/aarch64-linux-gnu/dri/swrast_dri.so ] \
		|| ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PACKAGES))

test: venv system-deps
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m pytest -q

test-slow: venv system-deps
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m pytest -q -m slow

napari: venv
	$(BIN)/napari $(FILE) --plugin napari-meddiff

benchmarks: venv
	$(BIN)/python benchmarks/bench_sampling.py

clean:
	rm -rf $(VENV) out
