"""canpipe's load tests: locust at a constant arrival rate against the real pipeline, with reports.

``python -m loadtest --rate 500 --duration 60`` runs one scenario and writes ``loadtest/reports/<name>/``;
``python -m loadtest tune --rate 500 --consumers 1,2,4`` compares consumer counts. See loadtest/README.md.
"""
