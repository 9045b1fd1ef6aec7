# The user's entry point.   make help   lists targets and variables.
#
#   make demo                                    the embedded tiny default, on a CPU
#   make demo-real                               the same chain on a real Gemma 3 270M base, on a CPU
#   make demo-rlvr                               GRPO on a Python reward function (no reward model) on that base
#   make test                                    the test suite
#   make data RECIPE=recipes/gemma2b_ko.yaml     format a recipe's datasets into runs/<run>/data/
#   make eval                                    benchmarks (lm-evaluation-harness) of the base and every final model
#   make chat STAGE=ppo                          talk to a trained model in the terminal
#   make publish REPO_ID=user/name               the final model, cleaned and checked, to the Hugging Face Hub

RECIPE ?= recipes/tiny_ko.yaml
OVERRIDES ?=
PYTHON_BIN ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
REPO_ID ?=
PUBLISH_ARGS ?=
STAGES ?=
TASKS ?=
STAGE ?= ppo
CHAT_ARGS ?=
ACCELERATE_CONFIG ?=
NUM_PROCESSES ?=
NUM_MACHINES ?=
MACHINE_RANK ?=
MAIN_PROCESS_IP ?=
MAIN_PROCESS_PORT ?=
# The launch, passed to every command that reads a recipe: each checks the recipe against it before anything runs
# (the data stage, at the head of every chain, included), and on a multi-machine run only machine 0 writes the data
# folder and the report.
LAUNCH_ARGS = \
	$(if $(ACCELERATE_CONFIG),--config-file $(ACCELERATE_CONFIG)) \
	$(if $(NUM_PROCESSES),--num-processes $(NUM_PROCESSES)) \
	$(if $(NUM_MACHINES),--num-machines $(NUM_MACHINES)) \
	$(if $(MACHINE_RANK),--machine-rank $(MACHINE_RANK)) \
	$(if $(MAIN_PROCESS_IP),--main-process-ip $(MAIN_PROCESS_IP)) \
	$(if $(MAIN_PROCESS_PORT),--main-process-port $(MAIN_PROCESS_PORT))
LAUNCH = $(PY) -m pipeline.launch $(LAUNCH_ARGS)

.DEFAULT_GOAL := help
.PHONY: help setup recipe data sft rm ppo dpo report eval chat publish plan demo demo-real demo-rlvr test test-fast test-gpu bench lint embedded

help:  ## this list
	@echo "targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo "variables:"
	@echo "  RECIPE=$(RECIPE)   recipe YAML"
	@echo "  OVERRIDES='key.sub=value ...'   recipe overrides"
	@echo "  VENV=$(VENV)   virtual environment created by 'make setup'"
	@echo "  TORCH_SPEC=$(TORCH_SPEC)   torch requirement installed first (CPU build here, CUDA build on a GPU box)"
	@echo "  ACCELERATE_CONFIG=configs/accelerate/...yaml   accelerate config (default: the recipe's launch section)"
	@echo "  NUM_PROCESSES=N   processes in total, over every machine"
	@echo "  NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT   multi-machine runs (README: Many machines)"
	@echo "  GPU_GIB=80   GPU memory that make plan checks the plan against"
	@echo "  REPO_ID=user/name   hub repository of make publish (default: the recipe's publish.repo_id)"
	@echo "  PUBLISH_ARGS='--private --stage sft --dtype bf16 --dry-run'   options of make publish"
	@echo "  STAGES='base sft ppo dpo'   models make eval evaluates (default: the recipe's eval.stages that exist)"
	@echo "  TASKS=kobest_boolq,haerae   lm-evaluation-harness tasks of make eval (default: the recipe's eval.tasks)"
	@echo "  STAGE=ppo   model of make chat (base, sft, ppo, dpo); CHAT_ARGS='--temperature 0' its options"

# The venv is (re)built when pyproject.toml changes; the stamp file marks a finished install.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/setup.log)"
	@{ $(PY) -m pip install --upgrade pip && $(PY) -m pip install "$(TORCH_SPEC)" && \
		$(PY) -m pip install -e ".[dev]"; } > $(VENV)/setup.log 2>&1 \
		|| { grep -v "is ignored" $(VENV)/setup.log | tail -40; echo "setup failed (full log: $(VENV)/setup.log)"; exit 1; }
	@$(PY) -c "import torch, transformers, trl, peft, accelerate, datasets, wandb, deepspeed" 2>/dev/null \
		|| { echo "setup failed: the packages did not import (log: $(VENV)/setup.log)"; exit 1; }
	@touch $@
	@echo "environment ready in $(VENV)"

setup: $(VENV)/.installed  ## create .venv and install everything (idempotent)

recipe: setup  ## print RECIPE resolved (defaults, the YAML, then OVERRIDES), validated; nothing runs
	$(PY) -m pipeline.core.cli --recipe $(RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)

embedded: setup  ## build the embedded tiny model and tokenizer into build/embedded/
	$(PY) -m pipeline.core.embedded tiny-gemma-ko

data: setup  ## check RECIPE against the launch, format its datasets into runs/<run>/data/ (reused when unchanged)
	$(PY) -m pipeline.data --recipe $(RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)

# A stage's upstream stages follow the recipe (`make plan` lists them): PPO with ppo.init_from runs no SFT, with
# ppo.reward_model: none no reward model. $(call upstream,STAGE) makes them first, in order (each skips when
# finished); the goals named before STAGE on the command line are made by this make already.
define upstream
	@needs=$$($(PY) -m pipeline.plan --needs $(1) --goals "$(MAKECMDGOALS)" --recipe $(RECIPE) $(LAUNCH_ARGS) \
		$(OVERRIDES)) && { [ -z "$$needs" ] || $(MAKE) --no-print-directory $$needs; }
endef

sft: data  ## supervised fine-tuning -> runs/<run>/sft/final/ (resumes when interrupted, skips when finished)
	$(LAUNCH) sft --recipe $(RECIPE) $(OVERRIDES)

rm: setup  ## reward model from the SFT checkpoint (or rm.init_from / ppo.init_from) -> runs/<run>/rm/final/ (PPO gate)
	$(call upstream,rm)
	$(LAUNCH) rm --recipe $(RECIPE) $(OVERRIDES)

ppo: setup  ## PPO against the reward model and/or reward functions -> runs/<run>/ppo/final/ (resumes, skips when finished)
	$(call upstream,ppo)
	$(LAUNCH) ppo --recipe $(RECIPE) $(OVERRIDES)

GPU_GIB ?= 80

plan: setup  ## print the resolved plan (stages, batch sizes, steps, per-GPU memory) without running or downloading
	$(PY) -m pipeline.plan --recipe $(RECIPE) --gpu-gib $(GPU_GIB) $(LAUNCH_ARGS) $(OVERRIDES)

dpo: setup  ## DPO on the preference pairs from the SFT checkpoint (or dpo.init_from) -> runs/<run>/dpo/final/
	$(call upstream,dpo)
	$(LAUNCH) dpo --recipe $(RECIPE) $(OVERRIDES)

report: setup  ## runs/<run>/report.md and report.json: every model trained (SFT, PPO, DPO when it ran) on held-out prompts
	$(call upstream,report)
	$(PY) -m pipeline.report --recipe $(RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)

eval: setup  ## benchmarks of the base and every final model (lm-evaluation-harness): [STAGES="base sft"] [TASKS=...]
	$(PY) -m pipeline.eval --recipe $(RECIPE) $(if $(STAGES),--stages "$(STAGES)") $(if $(TASKS),--tasks $(TASKS)) $(OVERRIDES)

chat: setup  ## talk to a finished model in the terminal (one line per answer when piped): [STAGE=ppo|dpo|sft|base] [CHAT_ARGS="--temperature 0 --show-prompt"]
	@$(PY) -m pipeline.chat --recipe $(RECIPE) --stage $(STAGE) $(CHAT_ARGS) $(OVERRIDES)

publish: setup  ## export the final model to runs/<run>/publish/ and upload it: REPO_ID=user/name [PUBLISH_ARGS="--private --stage sft --dry-run"]
	$(PY) -m pipeline.publish --recipe $(RECIPE) $(if $(REPO_ID),--repo-id $(REPO_ID)) $(PUBLISH_ARGS) $(OVERRIDES)

demo: setup  ## the embedded default end to end on a CPU: data, SFT, reward model, PPO, DPO, benchmarks, report
	$(PY) -m pipeline.data --recipe recipes/tiny_ko.yaml $(LAUNCH_ARGS) $(OVERRIDES)
	$(PY) -m pipeline.inspect --recipe recipes/tiny_ko.yaml --stage sft --index 0
	$(LAUNCH) sft --recipe recipes/tiny_ko.yaml $(OVERRIDES)
	$(LAUNCH) rm --recipe recipes/tiny_ko.yaml $(OVERRIDES)
	$(LAUNCH) ppo --recipe recipes/tiny_ko.yaml $(OVERRIDES)
	$(LAUNCH) dpo --recipe recipes/tiny_ko.yaml $(OVERRIDES)
	$(PY) -m pipeline.eval --recipe recipes/tiny_ko.yaml $(OVERRIDES)
	$(PY) -m pipeline.report --recipe recipes/tiny_ko.yaml $(LAUNCH_ARGS) $(OVERRIDES)

REAL_RECIPE := recipes/gemma3_270m_ko.yaml
demo-real: setup  ## the same chain on a real Gemma base (Gemma 3 270M, built offline) on a CPU, with ETAs
	$(PY) -m pipeline.data --recipe $(REAL_RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)
	$(LAUNCH) sft --recipe $(REAL_RECIPE) $(OVERRIDES)
	$(LAUNCH) rm --recipe $(REAL_RECIPE) $(OVERRIDES)
	$(LAUNCH) ppo --recipe $(REAL_RECIPE) $(OVERRIDES)
	$(PY) -m pipeline.eval --recipe $(REAL_RECIPE) $(OVERRIDES)
	$(PY) -m pipeline.report --recipe $(REAL_RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)

RLVR_RECIPE := recipes/gemma3_270m_ko_rlvr.yaml
ARITH_RECIPE := recipes/gemma3_270m_ko_arith.yaml
demo-rlvr: setup  ## verifiable rewards on the real Gemma 3 270M: GRPO on a Python rule from the real demo's SFT, no reward model
	$(PY) -m pipeline.data --recipe $(REAL_RECIPE) $(LAUNCH_ARGS)
	$(LAUNCH) sft --recipe $(REAL_RECIPE)
	$(PY) -m pipeline.data --recipe $(RLVR_RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)
	$(LAUNCH) ppo --recipe $(RLVR_RECIPE) $(OVERRIDES)
	$(PY) -m pipeline.report --recipe $(RLVR_RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)
	$(PY) -m pipeline.data --recipe $(ARITH_RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)
	$(LAUNCH) ppo --recipe $(ARITH_RECIPE) $(OVERRIDES)
	$(PY) -m pipeline.report --recipe $(ARITH_RECIPE) $(LAUNCH_ARGS) $(OVERRIDES)

test: setup  ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## the inner loop: the suite without the tests marked slow (a few minutes on a CPU)
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-gpu: setup  ## the GPU tier: the real Gemma 3 270M chain on CUDA in bf16, one process and ZeRO-2 (skipped without CUDA)
	$(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)

PEER_VENV ?= .peer-venv
PEER_DIR ?= ../shared/peer
BENCH_ITERS ?= 4
REAL_BENCH_ITERS ?= 2
BENCH_PROCS ?= $(shell nproc 2>/dev/null || echo 2)
SMALL_PPO := --batch 16 --response-length 48 --epochs 2 --minibatches 2 --iters $(BENCH_ITERS)
REAL_PPO := --batch 8 --response-length 48 --epochs 1 --minibatches 1 --iters $(REAL_BENCH_ITERS)

# One PPO comparison: $(1) name, $(2) model folder, $(3) settings, $(4) time and memory goals (ratios to the peer).
define ppo_bench
	$(PY) -m pipeline.bench ppo --model-dir $(2) $(3) | tail -n 1 > build/bench/ppo_$(1)_ours.json
	@if [ -f $(PEER_DIR)/setup.sh ]; then \
		bash $(PEER_DIR)/setup.sh $(PEER_VENV) && \
		TRL_EXPERIMENTAL_SILENCE=1 $(PEER_VENV)/bin/python $(PEER_DIR)/trl112_ppo.py --model-dir $(2) $(3) \
			2>/dev/null | tail -n 1 > build/bench/ppo_$(1)_peer.json && \
		$(PY) -m pipeline.bench compare build/bench/ppo_$(1)_ours.json build/bench/ppo_$(1)_peer.json --goals $(4); \
	else cat build/bench/ppo_$(1)_ours.json; echo "peer baseline not found at $(PEER_DIR): PPO ratios skipped"; fi
endef

bench: setup  ## benchmarks: data stage vs raw tokenizer; PPO vs TRL 1.12's PPOTrainer on two models (ratios)
	$(PY) -m pipeline.bench data --num-proc 1
	$(PY) -m pipeline.bench data --num-proc $(BENCH_PROCS)
	$(PY) -m pipeline.bench stream --rows 1000000
	$(PY) -m pipeline.core.embedded bench-gemma-32k > /dev/null
	$(PY) -m pipeline.core.embedded gemma-3-270m > /dev/null
	@mkdir -p build/bench
	$(PY) -m pipeline.bench chat-ready build/embedded/gemma-3-270m build/bench/gemma-3-270m > /dev/null
	$(call ppo_bench,small,build/embedded/bench-gemma-32k,$(SMALL_PPO),0.5 0.6)
	$(PY) -m pipeline.bench estimators --model-dir build/embedded/bench-gemma-32k -- $(SMALL_PPO) | tail -2
	$(call ppo_bench,real,build/bench/gemma-3-270m,$(REAL_PPO),0.6 0.8)

lint: setup  ## ruff check and format check
	$(PY) -m ruff check pipeline data_prep tests
	$(PY) -m ruff format --check pipeline data_prep tests
