"""Serving one model across several machines with `mx.distributed`."""
