# kmsd — two commands on a fresh Debian 12 machine with Swift installed:
#   make run    install what is missing, build, start kmsd in development mode
#   make test   install what is missing, build, check generated code, run every test
SHELL := /bin/bash
SWIFT ?= swift
DEV_DIR := $(CURDIR)/.dev
APT_PACKAGES := libssl-dev libsystemd-dev libsqlite3-dev sqlite3 pkg-config protobuf-compiler systemd util-linux
BUILD_FLAGS := --explicit-target-dependency-import-check error

.PHONY: all deps build run test proto check-proto bench clean

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
	echo; \
	exec $$bin/kmsd --dev --state-dir $(DEV_DIR)/state

# Suites run one after another: the fairness and journald tests measure latency on this
# 2-core machine, and other suites running beside them would measure the CPU scheduler instead.
test: build check-proto
	$(SWIFT) test --skip-build --no-parallel

# Regenerates Sources/KMSProtocol/Generated from Protocol/kmsd.proto.
proto: deps
	$(SWIFT) build --product protoc-gen-swift
	protoc --plugin=protoc-gen-swift=$$($(SWIFT) build --show-bin-path)/protoc-gen-swift \
	  --swift_opt=Visibility=Public --swift_out=Sources/KMSProtocol/Generated -IProtocol Protocol/kmsd.proto

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

# Release build; kmsd against a raw Unix-socket echo baseline in the same run.
bench: deps
	$(SWIFT) build -c release --product kmsd
	$(SWIFT) build -c release --product kmsbench
	@bin=$$($(SWIFT) build -c release --show-bin-path); $$bin/kmsbench --kmsd $$bin/kmsd $(BENCH_ARGS)

clean:
	rm -rf .build $(DEV_DIR)
