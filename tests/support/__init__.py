"""Loopback test servers that let the test-suite exercise zarrscope's remote reading.

* :mod:`.httpserver` - :class:`~.httpserver.ZarrHTTPServer`, a static-file HTTP/1.1 server with
  range requests, injectable latency / bandwidth limits / faults, and per-request accounting.
* :mod:`.s3server` - :class:`~.s3server.S3Server`, moto's S3 emulation on an ephemeral port.
"""
