"""Generation without a server: the batched generate loop (one process, or in lockstep with an
expert-parallel world) and the offline rank program with its local world."""
