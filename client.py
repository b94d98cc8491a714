#!/usr/bin/env python3
"""A small client for people: talk to a running backend from the terminal.

Examples:
  client.py demo                      start a server, load the default model, ask it a question
  client.py serve-default             start a server with the default model and keep it running
  client.py load MODEL [-o key:value] load a model folder, .gguf file or hub id
  client.py chat "What is MLX?"       stream a chat answer, with a live tokens/s line
  client.py complete "Once upon"      stream a raw completion (no chat template)
  client.py tokenize "Hello"          token ids of a text
  client.py detokenize 19556          text of token ids
  client.py embed "Hello world"       an embedding vector
  client.py score "The capital of France is" " Paris" " London"
  client.py metrics | status | health | free
"""

import argparse
import os
import sys
import time

import grpc

import backend_pb2
import backend_pb2_grpc
from mlx_backend import server_process
from mlx_backend.default_model import default_model_path as default_model

H = backend_pb2.HealthMessage()


def connect(addr: str, metadata):
    stub = backend_pb2_grpc.BackendStub(grpc.insecure_channel(addr))
    return stub, metadata


def wait_healthy(stub, metadata, proc=None, timeout=60):
    try:
        server_process.wait_healthy(stub, proc, timeout, metadata)
    except RuntimeError as err:
        raise SystemExit(str(err))


def start_server(addr: str):
    """run.sh as LocalAI starts it; its log goes to our terminal."""
    return server_process.start(addr)


def load(stub, metadata, model, options=()):
    print(f"loading {model} ...", file=sys.stderr)
    result = server_process.load_model(stub, model, options, timeout=None, metadata=metadata)
    print(result.message, file=sys.stderr)
    if not result.success:
        raise SystemExit(1)


def stream_answer(stub, metadata, request):
    """Print deltas as they arrive, then a tokens/s summary on stderr."""
    started = time.perf_counter()
    first = None
    count = 0
    for reply in stub.PredictStream(request, metadata=metadata):
        if reply.message:
            first = first or time.perf_counter()
            sys.stdout.write(reply.message.decode("utf-8", errors="replace"))
            sys.stdout.flush()
        count = reply.tokens or count
        elapsed = time.perf_counter() - first if first else 0
        if count > 1 and elapsed > 0:  # decode rate: tokens after the first
            sys.stderr.write(f"\r\033[K[{count} tokens, {(count - 1) / elapsed:.1f} tok/s]")
            sys.stderr.flush()
        final = reply
    print()
    print(f"[prompt {final.prompt_tokens} tokens in {final.timing_prompt_processing:.0f} ms; "
          f"{final.tokens} tokens in {final.timing_token_generation:.0f} ms; "
          f"total {time.perf_counter() - started:.2f}s]", file=sys.stderr)


def chat_request(text, args):
    messages = []
    if args.system:
        messages.append(backend_pb2.Message(role="system", content=args.system))
    messages.append(backend_pb2.Message(role="user", content=text))
    return backend_pb2.PredictOptions(Messages=messages, UseTokenizerTemplate=True,
                                      Tokens=args.max_tokens, Temperature=args.temperature,
                                      Seed=args.seed)


def cmd_demo(args):
    addr = args.addr
    stub, md = connect(addr, args.metadata)
    proc = None
    try:
        stub.Health(H, timeout=1, metadata=md)
    except grpc.RpcError:
        proc = start_server(addr)
        wait_healthy(stub, md, proc)
    try:
        load(stub, md, default_model())
        question = args.question or "What is the capital of France?"
        print(f"> {question}", file=sys.stderr)
        stream_answer(stub, md, chat_request(question, args))
    finally:
        if proc is not None:
            server_process.stop(proc)


def cmd_serve_default(args):
    proc = start_server(args.addr)
    stub, md = connect(args.addr, args.metadata)
    try:
        wait_healthy(stub, md, proc)
        load(stub, md, default_model(), args.option)
        print(f"serving the default model on {args.addr} (Ctrl-C stops)", file=sys.stderr)
        proc.wait()
    except KeyboardInterrupt:
        server_process.stop(proc)


def cmd_load(args):
    stub, md = connect(args.addr, args.metadata)
    load(stub, md, args.model or default_model(), args.option)


def cmd_chat(args):
    stub, md = connect(args.addr, args.metadata)
    stream_answer(stub, md, chat_request(args.text, args))


def cmd_complete(args):
    stub, md = connect(args.addr, args.metadata)
    stream_answer(stub, md, backend_pb2.PredictOptions(
        Prompt=args.text, Tokens=args.max_tokens, Temperature=args.temperature, Seed=args.seed))


def cmd_tokenize(args):
    stub, md = connect(args.addr, args.metadata)
    reply = stub.TokenizeString(backend_pb2.PredictOptions(Prompt=args.text), metadata=md)
    print(list(reply.tokens))


def cmd_score(args):
    stub, md = connect(args.addr, args.metadata)
    reply = stub.Score(backend_pb2.ScoreRequest(
        prompt=args.prompt, candidates=args.candidates, length_normalize=True), metadata=md)
    for text, score in zip(args.candidates, reply.candidates):
        print(f"{score.log_prob:10.4f}  (per token {score.length_normalized_log_prob:8.4f}, "
              f"{score.num_tokens} tokens)  {text!r}")


def cmd_detokenize(args):
    stub, md = connect(args.addr, args.metadata)
    reply = stub.Detokenize(backend_pb2.DetokenizeRequest(tokens=args.tokens), metadata=md)
    print(reply.content)


def cmd_embed(args):
    stub, md = connect(args.addr, args.metadata)
    reply = stub.Embedding(backend_pb2.PredictOptions(Embeddings=args.text), metadata=md)
    head = ", ".join(f"{v:.4f}" for v in reply.embeddings[:8])
    print(f"dim {reply.dim}, {reply.prompt_tokens} tokens: [{head}, ...]")


def cmd_metrics(args):
    stub, md = connect(args.addr, args.metadata)
    print(stub.GetMetrics(backend_pb2.MetricsRequest(), metadata=md))


def cmd_free(args):
    stub, md = connect(args.addr, args.metadata)
    print(stub.Free(H, metadata=md).message)


def cmd_status(args):
    stub, md = connect(args.addr, args.metadata)
    print(stub.Status(H, metadata=md))


def cmd_health(args):
    stub, md = connect(args.addr, args.metadata)
    print(stub.Health(H, timeout=5, metadata=md).message.decode())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default="localhost:50051", help="backend HOST:PORT")
    sub = parser.add_subparsers(dest="command", required=True)

    def generation_flags(p):
        p.add_argument("--max-tokens", type=int, default=256, help="most new tokens")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
        p.add_argument("--seed", type=int, default=0, help="0 = random")

    p = sub.add_parser("demo", help="start a server if none answers, load the default "
                                    "model and stream an answer")
    p.add_argument("question", nargs="?")
    p.add_argument("--system", default="")
    generation_flags(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("serve-default", help="run a server with the default model loaded")
    p.add_argument("-o", "--option", action="append", default=[], help="key:value option")
    p.set_defaults(func=cmd_serve_default)
    p = sub.add_parser("load", help="load a model (default: the bundled SmolLM2 GGUF)")
    p.add_argument("model", nargs="?")
    p.add_argument("-o", "--option", action="append", default=[], help="key:value option")
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("chat", help="stream a chat answer (chat template applied)")
    p.add_argument("text")
    p.add_argument("--system", default="")
    generation_flags(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("complete", help="stream a raw completion of a prompt")
    p.add_argument("text")
    generation_flags(p)
    p.set_defaults(func=cmd_complete)
    p = sub.add_parser("tokenize", help="print the token ids of a text")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)
    p = sub.add_parser("score", help="log-probability of each candidate after a prompt")
    p.add_argument("prompt")
    p.add_argument("candidates", nargs="+")
    p.set_defaults(func=cmd_score)
    p = sub.add_parser("detokenize", help="text of token ids")
    p.add_argument("tokens", nargs="+", type=int)
    p.set_defaults(func=cmd_detokenize)
    p = sub.add_parser("embed", help="embedding of a text (mean of final hidden states)")
    p.add_argument("text")
    p.set_defaults(func=cmd_embed)
    sub.add_parser("metrics", help="speed and token counts of the last request").set_defaults(
        func=cmd_metrics)
    sub.add_parser("free", help="unload the model and its caches").set_defaults(func=cmd_free)
    sub.add_parser("status", help="state and memory breakdown").set_defaults(func=cmd_status)
    sub.add_parser("health", help="is the server up?").set_defaults(func=cmd_health)
    args = parser.parse_args(argv)
    token = os.environ.get("LOCALAI_GRPC_AUTH_TOKEN", "")
    args.metadata = [("authorization", f"Bearer {token}")] if token else None
    try:
        args.func(args)
    except grpc.RpcError as err:
        raise SystemExit(f"{err.code().name}: {err.details()}")


if __name__ == "__main__":
    main()
