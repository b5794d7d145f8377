"""tquant benchmarks (installed as ``tquant.benchmarks``; run them with ``tquant bench ...``).

One script per subject; :mod:`tquant.benchmarks.common` holds the shared timing, memory,
device-description and result-writing helpers. Committed results live in ``results/<device>/``.
"""
