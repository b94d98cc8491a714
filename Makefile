# LocalAI-style targets. `make install` is idempotent; everything runs from .venv/.
PY := .venv/bin/python
ADDR ?= localhost:50051

.PHONY: install run chat test bench soak protogen clean

install:
	./install.sh

protogen:
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. backend.proto

# Serve the default model (SmolLM2-135M-Instruct GGUF) on $(ADDR), ready to answer.
run: install
	$(PY) client.py --addr $(ADDR) serve-default

# Ask the default model a question through a live server, streaming the answer.
chat: install
	$(PY) client.py --addr $(ADDR) demo

test: install
	$(PY) test.py

bench: install
	$(PY) bench/run.py

clean:
	rm -rf .venv backend_pb2.py backend_pb2_grpc.py

# N minutes of mixed traffic (not part of `make test`): SOAK_MINUTES=10 make soak
SOAK_MINUTES ?= 10
soak: install
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)
