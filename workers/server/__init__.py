"""The gRPC serving process: `moeserve.v1.Inference` + `grpc.health.v1.Health` over an `EngineLoop`,
and Prometheus metrics on a plain HTTP port. Model math and scheduling live in `moeserve.workers`
and `moeserve.workers.engine`; this package only translates and serves.
"""
