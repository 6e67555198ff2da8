"""Development tooling: the local stack tests and benchmarks share
(``testing``), the random-weight test model (``tinymodel``), a small OTLP
trace receiver (``trace_receiver``), the settings reference's generator
(``settings_doc``) and the bus twin, an in-memory ``Bus`` the service shells
run on in tests (``twin``).

Nothing a service imports at start-up or while it serves: the one use from a
service, building the tiny model when ``BATON_MODEL=tiny``, is a lazy import
on that path only (``tests/test_fences.py`` keeps it so).
"""
