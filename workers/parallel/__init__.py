"""Expert parallelism: placement map, the torch.distributed world and its collectives,
dispatch/combine, micro-batch ping-pong, `EPSettings`, and the one local-process launcher."""
