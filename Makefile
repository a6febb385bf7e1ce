# Convenience wrappers; the scripts are what the README documents.
.PHONY: demo test setup protos
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
setup:
	bash scripts/setup.sh --test
protos:
	.venv/bin/python scripts/gen_protos.py
