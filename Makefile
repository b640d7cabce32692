# tmerge — thin targets over the `tmerge` CLI.
#
#   make task1 task2 timm PORTION=4     the paper's pipeline on the embedded default data
#   make test                           the test suite
#   make task1 ARGS="trainer.max_epochs=3"   overrides pass through ARGS
#   make task1 PROFILE=paper            the paper's scale (experiments/paper/)
#   make benchmark                      the fixed protocol, ≥ 8 seeds, both targets + controls
#   make benchmark-report               its report (runs/benchmark/report/)
#
# The first target that needs Python creates .venv and installs the project into it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU build of torch: on this kind of machine `torch==2.13.0` is served as a local CPU wheel;
# an unpinned torch would pull a multi-GB CUDA build. On a GPU machine: make install TORCH=torch
TORCH  ?= torch==2.13.0
PORTION ?= 4
PROFILE ?= default
ARGS   ?=
TMERGE := $(BIN)/tmerge
RUN     = $(TMERGE) $(1) --profile $(PROFILE) $(ARGS)

.PHONY: help install data task1 task2 source test test-slow test-all lint clean

help:
	@sed -n '2,10p' Makefile

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	@# deepmriprep only provides the anatomy templates: its own dependency tree is not needed.
	$(BIN)/pip install -q --no-deps "deepmriprep==0.3.0"
	touch $@

data: install
	$(call RUN,data)

task1: install
	$(call RUN,task1)

task2: install
	$(call RUN,task2)

source: install
	$(call RUN,source)

# `make test`: every test but the slow ones (end-to-end trainings, DDP on two processes, the
# adaption capability test), a few minutes on 2 cores; `make test-slow`: those; CI runs both.
test: install
	$(BIN)/pytest -q -m "not slow"

test-slow: install
	$(BIN)/pytest -q -m slow

test-all: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf runs .pytest_cache

# BraTS stages: PORTION (4, 8 or 100) selects the share of the training pool.
.PHONY: timm imm sweep
timm: install
	$(TMERGE) timm --profile $(PROFILE) portion=$(PORTION) $(ARGS)

imm: install
	$(TMERGE) imm --profile $(PROFILE) portion=$(PORTION) $(ARGS)

sweep: install
	$(TMERGE) sweep --profile $(PROFILE) portion=$(PORTION) $(ARGS)

# Fast paths side by side (runs/bench/results.{json,md}): CPU 64³ in ≤ 2 minutes; GPU 128³, batch 2.
.PHONY: bench
bench: install
	$(call RUN,bench)

.PHONY: forgetting
forgetting: install
	$(TMERGE) forgetting --profile $(PROFILE) portion=$(PORTION) $(ARGS)

.PHONY: report
report: install
	$(TMERGE) report --profile $(PROFILE) $(ARGS)

# The decisive benchmark (docs/protocol.md §8), `--profile benchmark` (experiments/benchmark/):
# sources trained until their validation Dice is flat, then protocol=fixed over SEEDS on the
# BraTS-like target at 4 % and on the positive control (the generated `structures` target, 20 %):
# none, the best single source (named before running: M2 on BraTS, the paper's and earlier sweeps'
# best; M1 on the positive control, whose structures are task 1's), IMM, mean-T-IMM and T-IMM; the
# negative control (a noise source merged as a third) and the shallow baseline. Two sweeps side by
# side with one thread each. Everything goes to BENCH_RUNS; resumable: finished runs are skipped.
# Logs in $(BENCH_RUNS)/benchmark-*.log; then `make benchmark-report`.
.PHONY: benchmark benchmark-sources benchmark-report
SEEDS ?= [0,1,2,3,4,5,6,7]
BENCH_RUNS ?= runs/benchmark
STRUCTURES = data.root=$${TMERGE_DATA:-data}/default/structures data.test_size=10 data.pool_size=null \
  data.n4=false portion=20
BENCH_ENV = TMERGE_RUNS=$(BENCH_RUNS) OMP_NUM_THREADS=1
BENCH = $(BENCH_ENV) $(TMERGE) sweep --profile benchmark seed_folder=true "seeds=$(SEEDS)"
benchmark-sources: install
	$(TMERGE) data "kinds=[hcp,brats,structures]"
	TMERGE_RUNS=$(BENCH_RUNS) $(TMERGE) task1 --profile benchmark
	TMERGE_RUNS=$(BENCH_RUNS) $(TMERGE) task2 --profile benchmark
	TMERGE_RUNS=$(BENCH_RUNS) $(TMERGE) noise-source from=task1 name=noise

benchmark: benchmark-sources
	mkdir -p $(BENCH_RUNS)
	$(BENCH) "inits=[none,m2,imm,mean-timm,timm]" portion=4 $(ARGS) > $(BENCH_RUNS)/benchmark-brats.log 2>&1 & a=$$!; \
	( $(BENCH) "inits=[none,m1,imm,mean-timm,timm]" $(STRUCTURES) $(ARGS) > $(BENCH_RUNS)/benchmark-structures.log 2>&1 && \
	  $(BENCH) "inits=[timm]" run_name=timm-noise "sources=[task1,task2,noise]" portion=4 $(ARGS) \
	    > $(BENCH_RUNS)/benchmark-negative.log 2>&1 ) & b=$$!; \
	wait $$a && wait $$b
	@# The room transfer has to help in: none with every training subject, one seed. On the
	@# BraTS-like target one patch per subject and epoch (255 subjects: 2,500 steps, not 10,000).
	$(BENCH) "seeds=[0]" "inits=[none]" $(STRUCTURES) portion=100 $(ARGS) > $(BENCH_RUNS)/benchmark-headroom-structures.log 2>&1 & a=$$!; \
	$(BENCH) "seeds=[0]" "inits=[none]" portion=100 data.samples_per_volume=1 $(ARGS) \
	  > $(BENCH_RUNS)/benchmark-headroom-brats.log 2>&1 & b=$$!; \
	wait $$a && wait $$b
	$(BENCH_ENV) $(TMERGE) shallow --profile benchmark seed_folder=true "seeds=$(SEEDS)" portion=4 $(ARGS) & a=$$!; \
	$(BENCH_ENV) $(TMERGE) shallow --profile benchmark seed_folder=true "seeds=$(SEEDS)" $(STRUCTURES) $(ARGS) & b=$$!; \
	wait $$a && wait $$b

benchmark-report: install
	TMERGE_RUNS=$(BENCH_RUNS) $(TMERGE) report --profile benchmark $(ARGS)
