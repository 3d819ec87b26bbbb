"""What gRPC, HTTP and batch share, knowing no wire format: admission, readiness and draining, auth, request
ids, the in-flight registry, deltas, usage, prompt validation and errors. The entry point is core.ServingCore."""
