# TalkMesh. `make demo` makes a real video through the whole mesh; `make test` is what CI runs;
# `make up` runs the mesh on loopback until Ctrl-C.
SWIFT ?= swift
PYTEST ?= python3 -m pytest

.PHONY: bootstrap build release test unit-test integration-test bench up demo generate check-generated clean

bootstrap:
	scripts/bootstrap

build: bootstrap
	$(SWIFT) build

release: bootstrap
	$(SWIFT) build -c release

unit-test: build
	$(SWIFT) test

integration-test: build
	$(PYTEST) -q -p no:cacheprovider Tests/Integration

test: unit-test integration-test

bench: release
	bench/rpc
	bench/audio
	bench/media
	bench/dispatcher
	bench/gateway

up: build
	.build/debug/talkmesh up

demo: build
	scripts/demo

generate:
	proto/generate

check-generated:
	proto/generate --check

clean:
	rm -rf .build
