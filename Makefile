# Convenience wrappers; the scripts are what the README documents.
.PHONY: demo test check setup protos
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
check:
	bash scripts/check.sh
setup:
	bash scripts/setup.sh --test
protos:
	.venv/bin/python scripts/gen_protos.py
