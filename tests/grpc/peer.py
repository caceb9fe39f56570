#!/usr/bin/env python3
"""The gRPC peers of the differential gRPC test (tests/tests/grpc.rs).

    peer.py gen DIR            generate the echo.proto modules into DIR (grpc_tools.protoc)
    peer.py serve DIR ADDR     the upstream: serve weft.test.Echo on ADDR until killed
    peer.py client DIR ADDR    run the fixed list of calls against ADDR (the proxy), one JSON line each

The client prints, per call, what a gRPC application observes: the status code name and details, the
responses (or their count, sizes and digest), the trailing metadata `x-detail` and the initial metadata
`x-echo` / `x-blob-bin`. Everything printed is deterministic, so two proxies can be compared line by line.
"""

import hashlib
import json
import os
import queue
import sys
import time
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))


def gen(out):
    from grpc_tools import protoc

    os.makedirs(out, exist_ok=True)
    args = ["protoc", f"-I{HERE}", f"--python_out={out}", f"--grpc_python_out={out}", os.path.join(HERE, "echo.proto")]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")


def load(gen_dir):
    sys.path.insert(0, gen_dir)
    import grpc
    import echo_pb2
    import echo_pb2_grpc

    return grpc, echo_pb2, echo_pb2_grpc


# Request headers whose values change from request to request: only their presence is reported.
VARIABLE = {"x-request-id"}


def serve(gen_dir, addr):
    grpc, pb, pb_grpc = load(gen_dir)

    class Echo(pb_grpc.EchoServicer):
        def Unary(self, request, context):
            received = dict(context.invocation_metadata())
            initial = [(k, received[k]) for k in ("x-echo", "x-blob-bin") if k in received]
            if initial:
                context.send_initial_metadata(initial)
            context.set_trailing_metadata([("x-detail", "unary done")])
            if request.report_headers:
                seen = sorted(
                    (k, "<present>" if k in VARIABLE else (v.hex() if isinstance(v, bytes) else v))
                    for k, v in context.invocation_metadata()
                )
                return pb.EchoResponse(message=json.dumps(seen))
            return pb.EchoResponse(message=request.message)

        def ServerStream(self, request, context):
            for i in range(request.count):
                yield pb.EchoResponse(message=f"{request.message}-{i}", index=i)

        def ClientStream(self, request_iterator, context):
            total = 0
            n = 0
            for r in request_iterator:
                total += len(r.message.encode())
                n += 1
            return pb.EchoResponse(message=f"{n} messages", total=total)

        def BidiStream(self, request_iterator, context):
            for i, r in enumerate(request_iterator):
                yield pb.EchoResponse(message=r.message, index=i)

        def Fail(self, request, context):
            if request.send_headers:
                context.send_initial_metadata([("x-echo", "headers first")])
            for i in range(request.count):
                yield pb.EchoResponse(message=f"before failing {i}", index=i)
            context.set_trailing_metadata([("x-detail", f"failed with {request.code}")])
            code = next(c for c in grpc.StatusCode if c.value[0] == request.code)
            context.abort(code, request.details)

        def Slow(self, request, context):
            time.sleep(request.sleep_ms / 1000)
            return pb.EchoResponse(message=f"slept {request.sleep_ms} ms")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    pb_grpc.add_EchoServicer_to_server(Echo(), server)
    if server.add_insecure_port(addr) == 0:
        sys.exit(f"cannot listen on {addr}")
    server.start()
    print(f"serving on {addr}", flush=True)
    server.wait_for_termination()


def client(gen_dir, addr):
    grpc, pb, pb_grpc = load(gen_dir)
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0), ("grpc.max_receive_message_length", 8 << 20)]
    channel = grpc.insecure_channel(addr, options=options)
    grpc.channel_ready_future(channel).result(timeout=10)
    echo = pb_grpc.EchoStub(channel)

    def digest(data):
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def metadata(md, key):
        for k, v in md or ():
            if k == key:
                return v.hex() if isinstance(v, bytes) else v
        return None

    def observed(name, call, responses, error=None):
        source = error if error is not None else call
        line = {
            "call": name,
            "code": source.code().name if source is not None else "OK",
            "details": source.details() if source is not None else None,
            "responses": responses,
        }
        if source is not None:
            line["x-detail"] = metadata(source.trailing_metadata(), "x-detail")
            initial = source.initial_metadata()
            line["x-echo"] = metadata(initial, "x-echo")
            line["x-blob-bin"] = metadata(initial, "x-blob-bin")
        print(json.dumps(line, sort_keys=True), flush=True)

    def unary(name, method, request, describe=lambda r: r.message, **kwargs):
        try:
            response, call = method.with_call(request, timeout=kwargs.pop("timeout", 10), **kwargs)
            observed(name, call, describe(response))
        except grpc.RpcError as e:
            observed(name, None, None, e)

    def streamed(name, call, describe):
        """A call whose responses stream: those received before an error are kept."""
        got = []
        try:
            for r in call:
                got.append(r)
            observed(name, call, describe(got))
        except grpc.RpcError as e:
            observed(name, None, describe(got), e)

    # Unary, with metadata both ways (text and binary) and a trailer.
    unary("unary", echo.Unary, pb.EchoRequest(message="hello"),
          metadata=[("x-echo", "round trip"), ("x-blob-bin", b"\x00\x01\xfe\xff")])

    # A 1 MiB unary message each way.
    big = "".join(chr(ord("a") + i % 26) for i in range(1 << 20))
    unary("unary_1mib", echo.Unary, pb.EchoRequest(message=big),
          describe=lambda r: {"len": len(r.message), "sha256": digest(r.message)})

    # The request headers the upstream saw (proxy-added headers included, request ids masked).
    unary("unary_upstream_headers", echo.Unary, pb.EchoRequest(report_headers=True),
          describe=lambda r: json.loads(r.message))

    # 100 messages from the server.
    streamed("server_stream_100", echo.ServerStream(pb.EchoRequest(message="m", count=100), timeout=10),
             lambda got: {"count": len(got), "in_order": [r.index for r in got] == list(range(len(got))),
                          "last": got[-1].message if got else None})

    # 1 MiB from the client in 16 messages of 64 KiB.
    chunk = "x" * (64 << 10)
    try:
        response, call = echo.ClientStream.with_call(iter([pb.EchoRequest(message=chunk)] * 16), timeout=10)
        observed("client_stream_1mib", call, {"message": response.message, "total": response.total})
    except grpc.RpcError as e:
        observed("client_stream_1mib", None, None, e)

    # Bidirectional in lock step: each message is sent only after the previous echo came back, so a proxy
    # that buffers either direction stalls (and the deadline ends the call).
    answers = queue.Queue()

    def requests():
        for i in range(10):
            yield pb.EchoRequest(message=f"ping {i}")
            try:
                answers.get(timeout=5)
            except queue.Empty:
                return

    got = []
    try:
        call = echo.BidiStream(requests(), timeout=10)
        for r in call:
            got.append(r.message)
            answers.put(r)
        observed("bidi_lockstep_10", call, got)
    except grpc.RpcError as e:
        observed("bidi_lockstep_10", None, got, e)

    # Errors: trailers-only; headers then trailers; messages then an error; a message needing
    # percent-encoding.
    streamed("fail_not_found", echo.Fail(pb.EchoRequest(code=grpc.StatusCode.NOT_FOUND.value[0], details="no such thing"), timeout=10),
             lambda got: [r.message for r in got])
    streamed("fail_after_headers", echo.Fail(pb.EchoRequest(code=grpc.StatusCode.PERMISSION_DENIED.value[0], details="headers went first", send_headers=True), timeout=10),
             lambda got: [r.message for r in got])
    streamed("fail_after_3_messages", echo.Fail(pb.EchoRequest(code=grpc.StatusCode.ABORTED.value[0], details="gave up", count=3), timeout=10),
             lambda got: [r.message for r in got])
    streamed("fail_encoded_message", echo.Fail(pb.EchoRequest(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], details="bad value: ünïcode 100% ✓\tand a tab"), timeout=10),
             lambda got: [r.message for r in got])

    # Slow answers: in time without a route timeout; the 0.2 s route timeout (x-route: timeout) cut short
    # and met; the client's own deadline.
    unary("slow_300ms", echo.Slow, pb.EchoRequest(sleep_ms=300))
    unary("slow_1000ms_route_timeout_200ms", echo.Slow, pb.EchoRequest(sleep_ms=1000), metadata=[("x-route", "timeout")])
    unary("slow_20ms_route_timeout_200ms", echo.Slow, pb.EchoRequest(sleep_ms=20), metadata=[("x-route", "timeout")])
    unary("slow_2000ms_client_deadline_300ms", echo.Slow, pb.EchoRequest(sleep_ms=2000), timeout=0.3)

    # Services the upstream does not serve: a route to a cluster where nothing listens; a direct_response on a
    # gRPC-only route; no route at all.
    unary("dead_cluster", pb_grpc.MissingStub(channel).Unary, pb.EchoRequest(message="anyone?"))
    unary("direct_response_403", pb_grpc.DirectStub(channel).Unary, pb.EchoRequest(message="let me in"))
    unary("unrouted", pb_grpc.NowhereStub(channel).Unary, pb.EchoRequest(message="lost"))

    # The same channel still works after all of that.
    unary("unary_after_errors", echo.Unary, pb.EchoRequest(message="still here"))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    mode, gen_dir = sys.argv[1], sys.argv[2]
    if mode == "gen":
        gen(gen_dir)
    elif mode == "serve":
        serve(gen_dir, sys.argv[3])
    elif mode == "client":
        client(gen_dir, sys.argv[3])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
