"""Split training across processes on torch.distributed: configuration, the run plan, wire messages, the server
and device roles and their launch. Source: docs/distributed.md."""
