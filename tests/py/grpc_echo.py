"""A gRPC echo service and client built on grpcio's generic handlers (raw bytes, no
generated code), for testing that gRPC unary and streaming calls cross weft-proxy.

  python grpc_echo.py server PORT
  python grpc_echo.py client HOST:PORT [AUTHORITY]   # exits 0 when every call behaved
"""
import sys
import time
from concurrent import futures

import grpc

SERVICE = "weft.test.Echo"


def unary(request, context):
    context.set_trailing_metadata((("echo-trailer", "unary"),))
    return b"echo:" + request


def server_stream(request, context):
    for i in range(5):
        yield b"%s:%d" % (request, i)
    context.set_trailing_metadata((("echo-trailer", "stream"),))


def bidi(request_iterator, context):
    for msg in request_iterator:
        yield msg.upper()


def fail(request, context):
    context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")


def serve(port):
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port("127.0.0.1:%s" % port)
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def check(cond, what):
    if not cond:
        print("FAILED:", what, file=sys.stderr)
        sys.exit(1)


def client(target, authority=None):
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(target, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        call = ch.unary_unary("/%s/Unary" % SERVICE)
        rsp, info = call.with_call(b"hello", timeout=10)
        check(rsp == b"echo:hello", "unary response %r" % rsp)
        check(("echo-trailer", "unary") in info.trailing_metadata(), "unary trailers %r" % (info.trailing_metadata(),))

        stream = ch.unary_stream("/%s/ServerStream" % SERVICE)(b"s", timeout=10)
        got = list(stream)
        check(got == [b"s:%d" % i for i in range(5)], "server stream %r" % got)
        check(("echo-trailer", "stream") in stream.trailing_metadata(), "stream trailers")

        msgs = [b"a", b"b", b"c"]
        got = list(ch.stream_stream("/%s/Bidi" % SERVICE)(iter(msgs), timeout=10))
        check(got == [b"A", b"B", b"C"], "bidi %r" % got)

        try:
            ch.unary_unary("/%s/Fail" % SERVICE)(b"x", timeout=10)
            check(False, "Fail did not fail")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.FAILED_PRECONDITION, "status %s" % e.code())
            check(e.details() == "asked to fail", "details %r" % e.details())
    print("ok")


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve(sys.argv[2])
    else:
        client(*sys.argv[2:4])
