"""Request types, queue and batching, worker group launch, rank-0 and worker loops."""
