# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build on disk here so that no CUDA packages are pulled in (the GPU machine has its own)
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test browser clean

$(BIN)/vramfit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[quant,report,serve,test]" "$(TORCH_PIN)"
	touch $(BIN)/vramfit

install: $(BIN)/vramfit

demo: install
	$(BIN)/vramfit generate "a watercolor fox in a snowy forest" --model flux-tiny --steps 4 \
		--out outputs/demo/fox.png

test: install browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The page test (tests/test_serve_page.py) drives Debian's chromium with playwright's Python package (the `browser`
# extra; no browser download).
# Installed only where that is possible (root + apt-get); elsewhere the page test skips and says why.
browser: install
	$(BIN)/pip install -q -e ".[browser]" "$(TORCH_PIN)"
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make browser: chromium is missing and cannot be installed here (needs root + apt-get);" \
	    "tests/test_serve_page.py will skip"; fi; }

clean:
	rm -rf $(VENV) outputs
