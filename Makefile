# ipop - see build.sh for the real build (deps are pinned, fetched and cached there).
#
#   make            build ./ipop (static, musl)
#   make deps       fetch + build the dependencies (musl and host copies)
#   make test       run the test suite (tests/run.sh)
#   make unit       build + run tests/unit_*.c against the musl deps   -> build/tests/NAME
#   make unit-asan  same with host gcc + ASan/UBSan                     -> build/tests/NAME-asan
#   make fuzz       build + run tests/fuzz_*.c (clang libFuzzer), FUZZ_SECONDS each (default 60)
#   make bench      ipop vs plain veth vs the peers (tinc, nebula, wireguard-go, yggdrasil, n2n,
#                   ssh -L), one interleaved run, one table (tests/bench_peers.sh; root; ~15 min)
#   make bench-detail  the older per-topic benchmarks (tests/bench_{tap,user,ring}.sh)
#   make perfcheck  instructions per forwarded packet (callgrind on tests/perf_fwd.c) against
#                   tests/perfcheck.expected; fails when the hot path got slower (not in `make test`)
#   make scale      1000 nodes on loopback: join, ring, idle cost, routing, churn, DHT (tests/scale.py;
#                   about 10 minutes, loads the whole machine; SCALE_ARGS="--nodes 300 ..." for less)
#   make clean / distclean
#
# Test sources include ipop.c (#include "../ipop.c") and are compiled with -DIPOP_NO_MAIN.

SHELL := /bin/bash
FUZZ_SECONDS ?= 60

UNIT_SRCS  := $(wildcard tests/unit_*.c)
UNIT_NAMES := $(patsubst tests/%.c,%,$(UNIT_SRCS))
UNIT_BINS  := $(addprefix build/tests/,$(UNIT_NAMES))
ASAN_BINS  := $(addsuffix -asan,$(UNIT_BINS))
FUZZ_SRCS  := $(wildcard tests/fuzz_*.c)
FUZZ_NAMES := $(patsubst tests/%.c,%,$(FUZZ_SRCS))
FUZZ_BINS  := $(addprefix build/fuzz/,$(FUZZ_NAMES))

# Flags come from build.sh (expanded by make, so their shell quoting is honoured).
MUSL_CFLAGS = $(shell ./build.sh flags musl cflags)
MUSL_LIBS   = $(shell ./build.sh flags musl libs)
HOST_CFLAGS = $(shell ./build.sh flags host cflags)
HOST_LIBS   = $(shell ./build.sh flags host libs)

# -Wno-unused-function: with IPOP_NO_MAIN, helpers only reached from main() are unused.
TEST_WARN   = -Wall -Wextra -Werror -Wno-unused-function
TEST_DEFS   = -std=c11 -D_GNU_SOURCE -DIPOP_NO_MAIN -I.
SAN_FLAGS   = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
HDRS        = $(wildcard vendor/*.h vendor/lwip-port/arch/*.h)

.PHONY: all deps test unit unit-asan fuzz kit bench bench-detail perfcheck demo scale clean distclean

all:
	./build.sh

deps:
	./build.sh deps

test: all kit
	./tests/run.sh

# ---------------------------------------------------------------- unit tests
build/tests/%: tests/%.c ipop.c $(HDRS) | deps
	@mkdir -p $(@D)
	musl-gcc -static -O1 -g $(TEST_DEFS) $(TEST_WARN) $(MUSL_CFLAGS) $< -o $@ $(MUSL_LIBS)

build/tests/%-asan: tests/%.c ipop.c $(HDRS) | deps
	@mkdir -p $(@D)
	gcc -O1 -g $(SAN_FLAGS) $(TEST_DEFS) $(TEST_WARN) $(HOST_CFLAGS) $< -o $@ $(HOST_LIBS)

define run_tests
	@pass=0; fail=0; \
	for t in $(1); do \
	    echo "== $$t"; \
	    if ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ./$$t; \
	    then pass=$$((pass+1)); else echo "FAILED: $$t"; fail=$$((fail+1)); fi; \
	done; \
	echo "$(2): $$pass passed, $$fail failed"; \
	[ $$fail -eq 0 ]
endef

unit: $(UNIT_BINS)
ifeq ($(strip $(UNIT_BINS)),)
	@echo "no unit tests yet (tests/unit_*.c)"
else
	$(call run_tests,$(UNIT_BINS),unit)
endif

unit-asan: $(ASAN_BINS)
ifeq ($(strip $(ASAN_BINS)),)
	@echo "no unit tests yet (tests/unit_*.c)"
else
	$(call run_tests,$(ASAN_BINS),unit-asan)
endif

# ---------------------------------------------------------------- fuzzing
# UBSan findings abort (-fno-sanitize-recover), so libFuzzer counts them as crashes.
# Inputs: tests/corpus/NAME (committed seeds, read only) and build/fuzz/corpus/NAME
# (where libFuzzer writes what it finds).  A crash leaves build/fuzz/NAME-crash-*.
FUZZ_MAX_LEN ?= 4096
FUZZ_FLAGS  ?= -max_len=$(FUZZ_MAX_LEN) -timeout=25 -rss_limit_mb=2048 -print_final_stats=1

build/fuzz/%: tests/%.c ipop.c $(HDRS) | deps
	@mkdir -p $(@D)
	clang -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	    -fno-omit-frame-pointer $(TEST_DEFS) \
	    -Wall -Wextra -Wno-unused-function $(HOST_CFLAGS) $< -o $@ $(HOST_LIBS)

fuzz: $(FUZZ_BINS)
ifeq ($(strip $(FUZZ_BINS)),)
	@echo "no fuzz targets yet"
else
	@set -e; for f in $(FUZZ_NAMES); do \
	    mkdir -p build/fuzz/corpus/$$f; \
	    seeds=; [ -d tests/corpus/$$f ] && seeds=tests/corpus/$$f; \
	    echo "== fuzzing $$f for $(FUZZ_SECONDS) s"; \
	    ./build/fuzz/$$f -max_total_time=$(FUZZ_SECONDS) $(FUZZ_FLAGS) \
	        -artifact_prefix=build/fuzz/$$f- build/fuzz/corpus/$$f $$seeds </dev/null; \
	done
endif

# ---------------------------------------------------------------- hostile-peer kit (issue 18)
# tests/kit_NAME.c: attackers built from ipop.c itself (a real member or an
# outsider that completes real handshakes, then sends what a test scripts).
# Static musl like ./ipop, so they run in any namespace; tests build them
# with `make kit` (tests/lib.py kit_bin()).
KIT_SRCS  := $(wildcard tests/kit_*.c)
KIT_BINS  := $(patsubst tests/%.c,build/kit/%,$(KIT_SRCS))

build/kit/%: tests/%.c ipop.c $(HDRS) | deps
	@mkdir -p $(@D)
	musl-gcc -static -O1 -g $(TEST_DEFS) $(TEST_WARN) $(MUSL_CFLAGS) $< -o $@ $(MUSL_LIBS)

kit: $(KIT_BINS)

# ---------------------------------------------------------------- benchmarks
demo: all
	@tests/deps.sh demo
	./tests/demo.sh

bench: all
	bash tests/bench_peers.sh

bench-detail: all
	@for b in tests/bench_tap.sh tests/bench_user.sh tests/bench_ring.sh; do echo "== $$b"; bash "$$b"; done

# ---------------------------------------------------------------- perfcheck (issue 7)
# The same flags as ./ipop (-O2, musl, static) plus -g for callgrind's symbols.
build/perf/%: tests/%.c ipop.c $(HDRS) | deps
	@mkdir -p $(@D)
	musl-gcc -static -O2 -g $(TEST_DEFS) $(TEST_WARN) $(MUSL_CFLAGS) $< -o $@ $(MUSL_LIBS)

perfcheck: build/perf/perf_fwd
	bash tests/perfcheck.sh build/perf/perf_fwd

# ---------------------------------------------------------------- scale (issue 8)
SCALE_ARGS ?= --nodes 1000 --join-seconds 60 --churn-minutes 5 --churn-rate 0.1

scale: all
	python3 tests/scale.py $(SCALE_ARGS)

# ---------------------------------------------------------------- cleanup
clean:
	rm -rf build ipop ipop.tmp

distclean: clean
	rm -rf .cache
