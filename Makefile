# knots: build, test and example targets. `make test` is what CI runs (.ci/run).
CARGO ?= cargo
EXAMPLE_OUT ?= target/example-merge
EXAMPLE_ADAPTERS := $(wildcard tests/fixtures/knots-golden/knots_ties/adapters/task_*)

include models/models.mk

.PHONY: test fmt lint doc unit bench merge-example clean-example

test: models fmt lint doc unit

fmt:
	$(CARGO) fmt --check

lint:
	$(CARGO) clippy --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps

unit: models
	$(CARGO) test

bench:
	$(CARGO) bench --bench merge

# Merges the four example adapters with KnOTS-TIES into a PEFT adapter under $(EXAMPLE_OUT).
merge-example: clean-example
	$(CARGO) run --quiet -- merge --method knots-ties --density 0.2 --lambda 0.6 \
		--out $(EXAMPLE_OUT) $(EXAMPLE_ADAPTERS)

clean-example:
	rm -rf $(EXAMPLE_OUT)
