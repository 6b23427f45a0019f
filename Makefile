# kmsd — two commands on a fresh Debian 12 machine with Swift installed:
#   make run    install what is missing, build, start kmsd in development mode
#   make test   install what is missing, build, check generated code, run every test
SHELL := /bin/bash
SWIFT ?= swift
DEV_DIR := $(CURDIR)/.dev
APT_PACKAGES := libssl-dev libsystemd-dev libsqlite3-dev sqlite3 pkg-config protobuf-compiler systemd util-linux python3-cryptography openssl cryptsetup-bin python3-protobuf
BUILD_FLAGS := --explicit-target-dependency-import-check error

.PHONY: all deps build run test proto check-proto bench install clean fuzz fuzz-build fuzz-seeds fuzz-smoke crash

# make install: where things go. DESTDIR stages a tree for a package; PREFIX is where they run
# from (ExecStart= and the snippets' locations follow it). BIN=DIR installs executables already
# built in DIR instead of building a release.
PREFIX ?= /usr/local
DESTDIR ?=
SYSCONFDIR ?= /etc
BINDIR := $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
DOCDIR ?= $(PREFIX)/share/doc/kmsd
BIN ?=

all: build

# Installs missing Debian packages (as root, or through sudo).
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing$$missing"; \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: deps
	$(SWIFT) build --build-tests $(BUILD_FLAGS)

run: deps
	$(SWIFT) build $(BUILD_FLAGS) --product kmsd
	$(SWIFT) build $(BUILD_FLAGS) --product kmsctl
	@mkdir -p $(DEV_DIR)
	@bin=$$($(SWIFT) build --show-bin-path); \
	echo; \
	echo "kmsd (development mode): state in $(DEV_DIR)/state. In another terminal:"; \
	echo; \
	echo "  export KMSD_SOCKET=$(DEV_DIR)/state/kmsd.sock"; \
	echo "  export PATH=$$bin:\$$PATH"; \
	echo "  kmsctl create-key --description demo"; \
	echo "  echo -n secret | kmsctl encrypt --key-id KEY_ID --context app=demo | kmsctl decrypt --context app=demo"; \
	echo "  # credential provider (load-credential as root): KMSD_CREDENTIAL_SOCKET=$(DEV_DIR)/state/credentials.sock KMSD_CREDENTIAL_DIR=$(DEV_DIR)/state/credentials"; \
	echo; \
	exec $$bin/kmsd --dev --state-dir $(DEV_DIR)/state

# Suites run one after another: the fairness and journald tests measure latency on this
# 2-core machine, and other suites running beside them would measure the CPU scheduler instead.
# The fairness test measures the kmsd that ships, a release build (KMSD_RELEASE_BIN): the debug
# build stalls its event loop for tens of milliseconds at times under that flood.
test: build check-proto
	$(SWIFT) build -c release $(BUILD_FLAGS) --product kmsd
	KMSD_RELEASE_BIN="$$($(SWIFT) build -c release --show-bin-path)/kmsd" $(SWIFT) test --skip-build --no-parallel
	$(MAKE) --no-print-directory fuzz-smoke

# Fuzzing (libFuzzer): five targets (frames, request, ciphertext, policy, envelope: see
# Sources/KMSServer/FuzzTargets.swift), seeded from Protocol/vectors and Tests/FuzzRegressions.
#   make fuzz                      10 million executions per target (FUZZ_RUNS), no time limit
#   make fuzz FUZZ_TARGETS=request FUZZ_SECONDS=3600
#   make fuzz-smoke                20 s per target (part of make test)
#   make fuzz FUZZ_SANITIZE=address  AddressSanitizer + LeakSanitizer: memory errors and leaks
#                                  (about 3x slower; its own build in .build-fuzz-address)
# Findings land in .build-fuzz/crashes/TARGET/; each becomes a file in Tests/FuzzRegressions/TARGET.
FUZZ_SANITIZE ?=
comma := ,
FUZZ_DIR := $(CURDIR)/.build-fuzz$(if $(FUZZ_SANITIZE),-$(FUZZ_SANITIZE))
FUZZ_TARGETS ?= frames request ciphertext policy envelope
FUZZ_RUNS ?= 10000000
FUZZ_SECONDS ?= 0
FUZZ_FLAGS := $(if $(filter address,$(FUZZ_SANITIZE)),-detect_leaks=1)

fuzz-build: deps
	$(SWIFT) build -c release --product kmsfuzz --scratch-path $(FUZZ_DIR) -Xswiftc -sanitize=fuzzer$(if $(FUZZ_SANITIZE),$(comma)$(FUZZ_SANITIZE)) -Xswiftc -DKMSFUZZ_LIBFUZZER -Xswiftc -use-ld=lld

fuzz-seeds: deps
	$(SWIFT) build $(BUILD_FLAGS) --product kmsfuzz
	$$($(SWIFT) build --show-bin-path)/kmsfuzz seeds $(FUZZ_DIR)/seeds Protocol/vectors

fuzz: fuzz-build fuzz-seeds
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/crashes/$$t Tests/FuzzRegressions/$$t; \
	  echo "fuzz: $$t (runs $(FUZZ_RUNS), seconds $(FUZZ_SECONDS))"; \
	  KMSFUZZ_TARGET=$$t $(FUZZ_DIR)/release/kmsfuzz -runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_SECONDS) -timeout=10 $(FUZZ_FLAGS) \
	    -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix=$(FUZZ_DIR)/crashes/$$t/ \
	    $(FUZZ_DIR)/corpus/$$t $(FUZZ_DIR)/seeds/$$t Tests/FuzzRegressions/$$t 2>&1 | grep -E '^(#[0-9]+ +DONE|stat::|==|SUMMARY|INFO: Seed|Done)' ; \
	  test $${PIPESTATUS[0]} -eq 0 || { echo "fuzz: $$t found something: see $(FUZZ_DIR)/crashes/$$t"; exit 1; }; \
	done

fuzz-smoke:
	$(MAKE) --no-print-directory fuzz FUZZ_RUNS=-1 FUZZ_SECONDS=20

# Crash safety: KILLS SIGKILLs (default 500) at random moments during CreateKey, Encrypt,
# rotation, alias, policy and deletion traffic, every acknowledged change checked after each
# restart (make test runs the same test with 200), and the full-disk test.
KILLS ?= 500
crash: build
	KMSD_KILLS=$(KILLS) $(SWIFT) test --skip-build --no-parallel --filter 'LifecycleDurabilityTests|DiskFullTests|DurabilityTests'

# Regenerates Sources/KMSProtocol/Generated from Protocol/kmsd.proto.
proto: deps
	$(SWIFT) build --product protoc-gen-swift
	protoc --plugin=protoc-gen-swift=$$($(SWIFT) build --show-bin-path)/protoc-gen-swift \
	  --swift_opt=Visibility=Public --swift_out=Sources/KMSProtocol/Generated -IProtocol Protocol/kmsd.proto
	protoc --python_out=clients/python/kmsd -IProtocol Protocol/kmsd.proto

# Fails when the committed generated code is not what Protocol/kmsd.proto generates.
check-proto: deps
	$(SWIFT) build --product protoc-gen-swift
	@tmp=$$(mktemp -d); \
	protoc --plugin=protoc-gen-swift=$$($(SWIFT) build --show-bin-path)/protoc-gen-swift \
	  --swift_opt=Visibility=Public --swift_out=$$tmp -IProtocol Protocol/kmsd.proto; \
	if diff -u Sources/KMSProtocol/Generated/kmsd.pb.swift $$tmp/kmsd.pb.swift > $$tmp/diff; then \
	  echo "check-proto: generated code matches Protocol/kmsd.proto"; rm -rf $$tmp; \
	else \
	  head -40 $$tmp/diff; echo "check-proto: Sources/KMSProtocol/Generated is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; \
	fi
	@tmp=$$(mktemp -d); protoc --python_out=$$tmp -IProtocol Protocol/kmsd.proto; \
	if cmp -s clients/python/kmsd/kmsd_pb2.py $$tmp/kmsd_pb2.py; then \
	  echo "check-proto: clients/python/kmsd/kmsd_pb2.py matches Protocol/kmsd.proto"; rm -rf $$tmp; \
	else \
	  echo "check-proto: clients/python/kmsd/kmsd_pb2.py is stale: run 'make proto' and commit"; rm -rf $$tmp; exit 1; \
	fi

# Release build; kmsd against a raw Unix-socket echo baseline in the same run.
bench: deps
	$(SWIFT) build -c release --product kmsd
	$(SWIFT) build -c release --product kmsctl
	$(SWIFT) build -c release --product kmsbench
	@bin=$$($(SWIFT) build -c release --show-bin-path); $$bin/kmsbench --kmsd $$bin/kmsd --kmsctl $$bin/kmsctl $(BENCH_ARGS)

# Binaries, units, sysusers.d and tmpfiles.d snippets, the example configuration (copied to
# SYSCONFDIR/kmsd/kmsd.json only when none is there: an existing one is never overwritten) and
# the README. Nothing is started or enabled: README's "Install on a systemd host" goes on.
install:
	@set -e; bin="$(BIN)"; \
	if [ -z "$$bin" ]; then \
	  $(MAKE) --no-print-directory deps; \
	  $(SWIFT) build -c release $(BUILD_FLAGS) --product kmsd; \
	  $(SWIFT) build -c release $(BUILD_FLAGS) --product kmsctl; \
	  bin=$$($(SWIFT) build -c release --show-bin-path); \
	fi; \
	d="$(DESTDIR)"; \
	install -d -m 0755 "$$d$(BINDIR)" "$$d$(UNITDIR)" "$$d$(SYSUSERSDIR)" "$$d$(TMPFILESDIR)" "$$d$(DOCDIR)" "$$d$(SYSCONFDIR)/kmsd" "$$d$(SYSCONFDIR)/kmsd/identity-policies" "$$d$(SYSCONFDIR)/kmsd/credentials"; \
	install -m 0755 "$$bin/kmsd" "$$bin/kmsctl" "$$d$(BINDIR)/"; \
	sed -e 's|/usr/local/bin/kmsd|$(BINDIR)/kmsd|g' -e 's|/etc/kmsd/|$(SYSCONFDIR)/kmsd/|g' \
	    -e 's|file:///usr/share/doc/kmsd/|file://$(DOCDIR)/|' systemd/kmsd.service > "$$d$(UNITDIR)/kmsd.service"; \
	chmod 0644 "$$d$(UNITDIR)/kmsd.service"; \
	install -m 0644 systemd/kmsd.socket "$$d$(UNITDIR)/kmsd.socket"; \
	sed -e 's|file:///usr/share/doc/kmsd/|file://$(DOCDIR)/|' systemd/kmsd-credentials.socket > "$$d$(UNITDIR)/kmsd-credentials.socket"; \
	chmod 0644 "$$d$(UNITDIR)/kmsd-credentials.socket"; \
	sed -e 's|/usr/local/bin/kmsctl|$(BINDIR)/kmsctl|g' -e 's|/etc/kmsd/|$(SYSCONFDIR)/kmsd/|g' \
	    -e 's|file:///usr/share/doc/kmsd/|file://$(DOCDIR)/|' systemd/kmsd-luks@.service > "$$d$(UNITDIR)/kmsd-luks@.service"; \
	chmod 0644 "$$d$(UNITDIR)/kmsd-luks@.service"; \
	install -m 0644 systemd/kmsd.sysusers "$$d$(SYSUSERSDIR)/kmsd.conf"; \
	sed -e 's|/etc/kmsd|$(SYSCONFDIR)/kmsd|g' systemd/kmsd.tmpfiles > "$$d$(TMPFILESDIR)/kmsd.conf"; \
	chmod 0644 "$$d$(TMPFILESDIR)/kmsd.conf"; \
	sed -e 's|/etc/kmsd/|$(SYSCONFDIR)/kmsd/|g' systemd/kmsd.json > "$$d$(DOCDIR)/kmsd.json.example"; \
	chmod 0644 "$$d$(DOCDIR)/kmsd.json.example"; \
	if [ -e "$$d$(SYSCONFDIR)/kmsd/kmsd.json" ]; then echo "install: kept the existing $$d$(SYSCONFDIR)/kmsd/kmsd.json"; \
	else install -m 0644 "$$d$(DOCDIR)/kmsd.json.example" "$$d$(SYSCONFDIR)/kmsd/kmsd.json"; fi; \
	install -m 0644 README.md "$$d$(DOCDIR)/README.md"; \
	echo "install: kmsd installed under $$d$(PREFIX); next: README.md, 'Install on a systemd host'"

clean:
	rm -rf .build $(DEV_DIR)
