# TalkMesh. `make demo` makes a real video through the whole mesh; `make test` is what CI runs
# (`make check` is its quick part: unit and integration tests); `make up` runs the mesh on
# loopback until Ctrl-C.
SWIFT ?= swift
PYTEST ?= python3 -m pytest

.PHONY: bootstrap build release test check unit-test integration-test integration-test-s3 fuzz sanitize bench up demo images cluster-test generate check-generated clean

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

# The service tests again with every service on S3 (moto on loopback, signatures checked).
S3_SERVICE_TESTS = test_dispatcher.py test_dispatcher_scaleout.py test_gateway.py test_gateway_uploads.py test_gateway_grpc.py test_gateway_seeds.py \
	test_gateway_tls.py test_gateway_redis.py test_readme_examples.py test_retention.py
integration-test-s3: build
	TALKMESH_TEST_BLOB_STORE=s3 $(PYTEST) -q -p no:cacheprovider $(addprefix Tests/Integration/,$(S3_SERVICE_TESTS))

check: unit-test integration-test integration-test-s3

# The scale-out on separate hosts (network namespaces on a bridge; needs root): 30 jobs through
# kills and a dead link, with a table of calls served and jobs driven per replica.
cluster-test: build
	$(PYTEST) -q -s -p no:cacheprovider Tests/Cluster

# Every fuzz target for FUZZ_SECONDS (12) under libFuzzer + ASan; no crash allowed.
fuzz: bootstrap
	scripts/fuzz

# Unit tests and the services' integration tests on ASan and TSan builds; no finding allowed.
sanitize: bootstrap
	scripts/sanitize

test: check cluster-test fuzz sanitize

bench: release
	bench/rpc
	bench/audio
	bench/media
	bench/dispatcher
	bench/gateway
	bench/blobstore

up: build
	.build/debug/talkmesh up

demo: build
	scripts/demo

# One image per service from the one Dockerfile (needs a Docker engine; IMAGE_TAG=dev by default).
IMAGES = media audio dispatcher gateway runpod-emulator
IMAGE_TAG ?= dev
PORT_media = 50051
PORT_audio = 50052
PORT_dispatcher = 50053
PORT_gateway = 8080
PORT_runpod-emulator = 8090
images:
	$(foreach s,$(IMAGES),docker build --build-arg SERVICE=$(s) --build-arg PORT=$(PORT_$(s)) -t talkmesh-$(s):$(IMAGE_TAG) . &&) true

generate:
	proto/generate

check-generated:
	proto/generate --check

clean:
	rm -rf .build .build-fuzz .build-address .build-thread
