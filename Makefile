# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU build on disk here so that no CUDA packages are pulled in (the GPU machine has its own)
TORCH_PIN ?= torch==2.13.0

.PHONY: install demo test clean

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

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) outputs
